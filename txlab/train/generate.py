"""`txlab generate`: sampling from a `txlab train` checkpoint (temperature, top-k, top-p, seed).

The model runs without a KV cache (each new token re-reads the context, cropped to the model's
sequence length): simple and exact, and fast enough for the sizes trained here. Sampling stops at
the end-of-text token or after `max_new_tokens`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from txlab.config import ConfigError
from txlab.data.tokenizer import Tokenizer, load_tokenizer


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
    """New token ids after `prompt_ids`; temperature 0 is greedy."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt_ids) or ([eot_id] if eot_id is not None else [0])  # an empty prompt starts a document
    out: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-context:] if context else ids], device=device)
        logits = F.linear(model(x)[0, -1], model.lm_head.weight).float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt == eot_id:
            break
        ids.append(nxt)
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
