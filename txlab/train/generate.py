"""`txlab generate`: sampling from a `txlab train` checkpoint (temperature, top-k, top-p, seed).

Tokens come from the decode engine's one generation loop (`txlab.model.decode.generate_tokens`) under
the `cache` KV policy: the prompt is prefilled once, then each token is one step against the cache.
Past the model's positions the context is cropped to its last `context` tokens, as the model sees a
longer text (the window is prefilled again for each further token). Sampling stops at the end-of-text
token or after `max_new_tokens`.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from pathlib import Path

import torch

from txlab.config import ConfigError
from txlab.data.tokenizer import Tokenizer, load_tokenizer
from txlab.model.decode import Inference, generate_tokens


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """(V,) logits with everything outside the top k and outside the top-p nucleus set to -inf."""
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sampler(
    temperature: float, top_k: int | None, top_p: float | None, gen: torch.Generator
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits (1, V) -> the next token (1,): the argmax at temperature 0, else a draw from `gen` over the
    tokens top-k and top-p keep, at `temperature`."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        probs = torch.softmax(filter_logits(logits[0] / temperature, top_k, top_p), dim=-1)  # (V,)
        return torch.multinomial(probs, 1, generator=gen)

    return pick


@torch.no_grad()
def sample(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eot_id: int | None = None,
    context: int | None = None,
) -> list[int]:
    """New token ids after `prompt_ids`; temperature 0 is greedy. `context`: the positions the model
    holds (None: as many as the prompt and the tokens need); the model sees the last `context` tokens."""
    if max_new_tokens <= 0:
        return []
    param = next(model.parameters())
    gen = torch.Generator(device=param.device).manual_seed(seed)
    ids = list(prompt_ids) or ([eot_id] if eot_id is not None else [0])  # an empty prompt starts a document
    # n tokens use len(ids) + n - 1 positions (the last token is not fed back); at most `context` are held
    positions = len(ids) + max_new_tokens - 1
    run = Inference(model, min(positions, context) if context else positions, 1, kv="cache", dtype=param.dtype)
    tokens = generate_tokens(
        run, torch.tensor([ids], device=param.device), sampler(temperature, top_k, top_p, gen), slide=True
    )
    out: list[int] = []
    for _, token in itertools.islice(tokens, max_new_tokens):
        nxt = int(token)
        if nxt == eot_id:
            break
        out.append(nxt)
    return out


def checkpoint_tokenizer(ckpt: Path, spec: str) -> Tokenizer:
    """The run's tokenizer: the copy saved in the run directory when there is one, else `spec`."""
    saved = (ckpt if ckpt.is_dir() else ckpt.parent) / "tokenizer"
    if spec != "bytes" and saved.is_dir():
        return load_tokenizer(f"hf:{saved}")
    return load_tokenizer(spec)


def generate(
    checkpoint: str,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    """The prompt's continuation, as text."""
    from txlab.train.checkpoint import load_model

    model, cfg = load_model(checkpoint, device)
    tok = checkpoint_tokenizer(Path(checkpoint), cfg.data.tokenizer)
    context = cfg.model.n_positions or cfg.workload.seq_len
    new = sample(model, tok.encode(prompt), max_new_tokens, temperature, top_k, top_p, seed, tok.eot_id, context)
    return tok.decode(new)


def check_sampling(args: argparse.Namespace) -> None:
    if args.temperature < 0:
        raise ConfigError(f"--temperature: must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k <= 0:
        raise ConfigError(f"--top-k: must be > 0, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p: must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens: must be > 0, got {args.max_new_tokens}")
