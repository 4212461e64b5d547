"""Attention distance: how far back each layer looks, from the model's own forward pass.

For a model (`txlab.model.gpt.GPT`) and a sequence of token ids, every query position i attends to keys
j <= i with probabilities p_ij (each query row sums to 1). The distance of that attention is d = i - j
(0 = the token itself, 1 = the previous token, ...). Per layer and per head, the **mass at distance d**
is the attention probability summed over every query at that distance, divided by the number of
queries, so each (layer, head)'s masses sum to 1; head -1 is all heads together (the mean of the heads'
distributions). The **mean distance** is sum_d d * mass(d): the average number of tokens back that the
layer's attention reaches.

How: each attention module's kernel (`Attention.attn_fn`, a plain attribute the policies set) is swapped
for a capturing one that computes the materialized softmax (as `math_attention` does, grouped KV heads
included), adds its probabilities into the layer's histogram and returns probabilities @ v, so the
forward is the model's own. Query rows are taken in chunks so a layer holds at most about
`ROW_CHUNK_BYTES` of probabilities at once, not T x T per head. The kernels are put back afterwards.

Reference, for a layer that attends uniformly to its causal past over T tokens: query i spreads 1 / (i+1)
over its i+1 keys, so mass(d) = (1 / T) * sum_{i >= d} 1 / (i + 1) (`uniform_mass`).

Also here: reading the inputs of `txlab attention` (the text file, a Hugging Face checkpoint directory and
its tokenizer). No plotting: the drawing is `txlab.analysis.attention`, from the table alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from txlab.config import ConfigError
from txlab.model.gpt import GPT, Attention

COLUMNS = ("layer", "head", "distance", "mass", "mean_distance", "tokens")
ALL_HEADS = -1
ROW_CHUNK_BYTES = 64 * 2**20  # probabilities held at once per layer (fp32)
DEFAULT_MAX_TOKENS = 4096  # tokens of the text used without --max-tokens (the work grows as T^2)


class _Capture:
    """The attention kernel of one layer that also records its distance histogram, (H, T) fp32."""

    def __init__(self, chunk_bytes: int = ROW_CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self.hist: torch.Tensor | None = None  # (H, T): probability summed over batch and queries

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, T, D = q.shape
        groups = H // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scale = 1.0 / math.sqrt(D)
        if self.hist is None:
            self.hist = torch.zeros(H, T, dtype=torch.float64, device=q.device)
        out = torch.empty_like(q)
        rows = max(1, self.chunk_bytes // (4 * B * H * T))
        for r0 in range(0, T, rows):
            r1 = min(r0 + rows, T)
            s = (q[:, :, r0:r1].float() @ k[:, :, :r1].float().transpose(-2, -1)) * scale  # (B, H, R, r1)
            qpos = torch.arange(r0, r1, device=q.device)[:, None]
            kpos = torch.arange(r1, device=q.device)[None, :]
            s = s.masked_fill(kpos > qpos, float("-inf"))
            p = s.softmax(dim=-1)
            out[:, :, r0:r1] = (p.to(v.dtype) @ v[:, :, :r1]).to(q.dtype)
            # distance i - j of every (query, key) cell; future cells (p == 0 exactly) folded onto 0
            dist = (qpos - kpos).clamp_min(0).flatten()
            self.hist.index_add_(1, dist, p.sum(0).flatten(1).double())
        return out


def model_positions(model: GPT) -> int:
    """Positions the model holds: its learned position table, else its rotary tables."""
    if model.wpe is not None:
        return model.wpe.num_embeddings
    return model.rope_cos.shape[0]


@torch.no_grad()
def attention_histograms(model: GPT, ids: torch.Tensor, chunk_bytes: int = ROW_CHUNK_BYTES) -> torch.Tensor:
    """ids (B, T) -> (layers, H, T) fp64: per layer and head, the attention mass at each distance (each
    (layer, head) row sums to 1). Runs the model's own forward, in eval mode, with capturing kernels."""
    if ids.dim() == 1:
        ids = ids[None]
    T = ids.shape[1]
    if T < 1:
        raise ValueError("attention distance needs at least one token")
    if T > model_positions(model):
        raise ValueError(f"{T} tokens but the model holds {model_positions(model)} positions")
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [m.attn_fn for m in modules]
    captures = [_Capture(chunk_bytes) for _ in modules]
    was_training = model.training
    model.eval()
    try:
        for m, c in zip(modules, captures):
            m.attn_fn = c
        model(ids.to(next(model.parameters()).device))
    finally:
        for m, fn in zip(modules, saved):
            m.attn_fn = fn
        model.train(was_training)
    # each query row sums to 1, so a histogram sums to its query count; dividing by its own sum instead
    # keeps fp32 softmax rounding out of the normalisation
    return torch.stack([c.hist.cpu() / c.hist.sum(-1, keepdim=True).cpu() for c in captures])


def attention_distance(model: GPT, ids, per_head: bool = True, chunk_bytes: int = ROW_CHUNK_BYTES) -> pd.DataFrame:
    """The distance table of `model` on token ids (a list, or a (T,) / (B, T) tensor).

    One row per (layer, head, distance), distance 0 .. T-1: `mass` (sums to 1 over distances per layer and
    head), `mean_distance` (of that layer and head), `tokens` (T). head -1: all heads of the layer
    together; heads 0 .. H-1 only with `per_head`."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    hist = attention_histograms(model, ids, chunk_bytes)  # (L, H, T)
    L, H, T = hist.shape
    groups = [(ALL_HEADS, hist.mean(dim=1))] + ([(h, hist[:, h]) for h in range(H)] if per_head else [])
    d = torch.arange(T, dtype=torch.float64)
    frames = []
    for head, mass in groups:  # mass (L, T)
        mean = (mass * d).sum(-1)  # (L,)
        frames.append(
            pd.DataFrame(
                {
                    "layer": torch.arange(L).repeat_interleave(T).numpy(),
                    "head": head,
                    "distance": d.long().repeat(L).numpy(),
                    "mass": mass.flatten().numpy(),
                    "mean_distance": mean.repeat_interleave(T).numpy(),
                    "tokens": T,
                }
            )
        )
    df = pd.concat(frames, ignore_index=True)
    df = df.astype({"layer": "int32", "head": "int32", "distance": "int32", "tokens": "int32"})
    return df.sort_values(["layer", "head", "distance"], ignore_index=True)[list(COLUMNS)]


def uniform_mass(T: int) -> torch.Tensor:
    """(T,) the mass at each distance of attention spread uniformly over the causal past of T tokens."""
    inv = 1.0 / torch.arange(1, T + 1, dtype=torch.float64)  # query i gives 1 / (i + 1) to each key
    return inv.flip(0).cumsum(0).flip(0) / T  # distance d: queries i >= d


# --- the inputs of `txlab attention` ----------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def read_text(path: str) -> str:
    """The text file's contents; bad input (one line) when missing, unreadable, not UTF-8 or empty."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--text: {path}: no such file" + (" (a directory)" if p.is_dir() else ""))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--text: {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"--text: {path}: cannot read ({e.strerror or e})") from None
    if not text.strip():
        raise ConfigError(f"--text: {path}: the file is empty (nothing to attend over)")
    return text


def check_inputs(checkpoint: str, text: str, max_tokens: int | None) -> tuple[str, str]:
    """The text and the checkpoint's kind, every input checked that can be before a model is loaded."""
    if max_tokens is not None and max_tokens < 2:
        raise ConfigError(f"--max-tokens: must be >= 2, got {max_tokens}")
    return read_text(text), checkpoint_kind(checkpoint)


def checkpoint_kind(path: str) -> str:
    """'txlab' (a run directory or its checkpoint file) or 'hf' (a directory with config.json); bad
    input otherwise, before anything is loaded. Local paths only: nothing is downloaded."""
    p = Path(path)
    if p.is_file() or (p.is_dir() and (p / "checkpoint.pt").is_file()):
        return "txlab"
    if p.is_dir() and (p / "config.json").is_file():
        return "hf"
    what = "no such file or directory" if not p.exists() else "no checkpoint there"
    raise ConfigError(
        f"--checkpoint: {path}: {what} (expected a txlab run directory or its checkpoint.pt, or a local "
        "Hugging Face checkpoint directory with config.json)"
    )


class _AutoTokenizer:
    """A Hugging Face checkpoint's own tokenizer, special tokens (e.g. a beginning-of-text) added as
    the model is run."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])


def load_hf(path: str, device: str | torch.device = "cpu"):
    """A local Hugging Face checkpoint as a txlab model (its weights) and a tokenizer: the directory's
    own when it has one, else the byte tokenizer (ids 0..255)."""
    from txlab.config.hf import read_hf_config
    from txlab.data.tokenizer import ByteTokenizer
    from txlab.model.hf import from_pretrained

    try:
        # positions: the context the checkpoint was made for (GPT-2's table; RoPE models' max_position_embeddings)
        context = read_hf_config(str(path)).get("max_position_embeddings")
        model = from_pretrained(str(path), seq_len=int(context) if isinstance(context, int) and context > 0 else None)
    except ConfigError as e:
        raise ConfigError(f"--checkpoint: {e}") from None
    d = Path(path)
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        return model.to(device), ByteTokenizer()
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a tokenizer that does not load is bad input, in one line
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else e.__class__.__name__
        raise ConfigError(f"--checkpoint: {path}: its tokenizer does not load ({first})") from None
    return model.to(device), _AutoTokenizer(tok)


def token_ids(model: GPT, ids: list[int], max_tokens: int | None, where: str) -> tuple[list[int], str | None]:
    """The ids to run (the first `max_tokens`, at most the model's positions) and a note when the text was
    cut; bad input when too few tokens remain or an id is outside the model's vocabulary."""
    positions = model_positions(model)
    if max_tokens is not None and max_tokens > positions:
        raise ConfigError(f"--max-tokens: {max_tokens} is above the model's {positions} positions")
    limit = max_tokens or min(positions, DEFAULT_MAX_TOKENS)
    if len(ids) < 2:
        raise ConfigError(f"--text: {where}: {len(ids)} token(s); attention distance needs at least 2")
    V = model.cfg.vocab_size
    if max(ids[:limit]) >= V:
        raise ConfigError(
            f"--text: {where}: token id {max(ids[:limit])} is outside the model's {V} ids (the byte tokenizer "
            "is used for a checkpoint without one: save its tokenizer into the directory)"
        )
    note = None
    if len(ids) > limit:
        why = "--max-tokens" if max_tokens else "the model's positions"
        if not max_tokens and limit < positions:
            why = f"the default; --max-tokens up to the model's {positions} positions for more"
        note = f"the text has {len(ids)} tokens; using the first {limit} ({why})"
    return ids[:limit], note
