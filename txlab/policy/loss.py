"""Language-model losses over the model's hidden states, chosen by name (`policy.loss`).

`full` builds all (B*T) x V logits. `chunked` projects and scores `loss_chunk` tokens at a time
under non-reentrant checkpointing: forward keeps only each chunk's hidden slice, backward recomputes
one chunk's logits at a time, so no more than loss_chunk x V logits ever exist (at GPT-2's 50k
vocabulary, full logits of 8k tokens alone take 1.5 GiB in fp32).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def full_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, C), weight (V, C), targets (B, T) -> mean cross-entropy (nats/token)."""
    logits = F.linear(hidden, weight)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    h = hidden.flatten(0, 1)  # (B*T, C)
    t = targets.flatten()
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + checkpoint(_chunk_ce_sum, h[s : s + chunk], weight, t[s : s + chunk], use_reentrant=False)
    return total / h.shape[0]


def get_loss(name: str, loss_chunk: int = 1024) -> LossFn:
    match name:
        case "full":
            return full_loss
        case "chunked":
            return functools.partial(chunked_loss, chunk=loss_chunk)
        case _:
            raise ValueError(f"unknown loss {name!r}; known: full, chunked")
