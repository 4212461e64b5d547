"""Language-model losses over the model's hidden states, chosen by name (`policy.loss`).

`full` builds all (B*T) x V logits. `chunked` projects and scores `loss_chunk` tokens at a time, so no
more than loss_chunk x V logits ever exist (at GPT-2's 50k vocabulary, full logits of 8k tokens alone take
1.5 GiB in fp32). When a gradient is wanted it computes it in the same pass (a fused linear
cross-entropy, as Liger's): each chunk's logits become their gradient in place, (softmax - one-hot) / N,
which is multiplied into the hidden states' and the weight's gradients at once; backward only scales
them by the incoming gradient. The logits are never recomputed, so the loss costs the full loss's three
projections, not four (an earlier version recomputed each chunk under checkpointing).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def full_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, C), weight (V, C), targets (B, T) -> mean cross-entropy (nats/token)."""
    logits = F.linear(hidden, weight)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype F.linear computes in here: autocast's when it is on for t's device."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over chunks of rows, with the gradients made in forward (see the module doc)."""

    @staticmethod
    def forward(ctx, h, weight, t, chunk: int, scale: float):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        mm = _matmul_dtype(h)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = h.new_zeros((), dtype=torch.float32)
        w_mm = weight.to(mm)
        for s in range(0, h.shape[0], chunk):
            hs, ts = h[s : s + chunk], t[s : s + chunk]
            logits = F.linear(hs.to(mm), w_mm).float()  # (n, V)
            lse = logits.logsumexp(-1, keepdim=True)
            total += (lse - logits.gather(1, ts[:, None])).sum()  # cross-entropy: log-sum-exp - target logit
            # d(sum CE)/d logits = softmax - one-hot, in the logits' own storage; times the mean's 1/N
            g = logits.sub_(lse).exp_()
            g[torch.arange(len(ts), device=g.device), ts] -= 1.0
            g = g.mul_(scale).to(mm)
            if need_h and dh.dtype == mm:
                torch.mm(g, w_mm, out=dh[s : s + chunk])
            elif need_h:
                dh[s : s + chunk] = g @ w_mm
            if need_w:
                if mm == torch.float32:
                    dw.addmm_(g.T, hs)
                else:
                    dw += g.T @ hs.to(mm)
            del logits, lse, g
        ctx.save_for_backward(*(x for x in (dh, dw) if x is not None))
        ctx.has = (need_h, need_w)
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        dh = next(saved).mul_(grad) if ctx.has[0] else None
        dw = next(saved).mul_(grad) if ctx.has[1] else None
        return dh, dw, None, None, None


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    h = hidden.flatten(0, 1)  # (B*T, C)
    t = targets.flatten()
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(h, weight, t, chunk, 1.0 / h.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + _chunk_ce_sum(h[s : s + chunk], weight, t[s : s + chunk])
    return total / h.shape[0]


def get_loss(name: str, loss_chunk: int = 1024) -> LossFn:
    match name:
        case "full":
            return full_loss
        case "chunked":
            return functools.partial(chunked_loss, chunk=loss_chunk)
        case _:
            raise ValueError(f"unknown loss {name!r}; known: full, chunked")
