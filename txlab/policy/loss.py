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


# How the vocabulary-parallel loss (txlab.parallel.tp) reduces a per-row figure over the ranks that hold
# the other vocabulary rows: in place, "max" or "sum" (an all-reduce over the TP group).
Reduce = Callable[[torch.Tensor, str], None]


def _scores(logits: torch.Tensor, t: torch.Tensor, start: int, reduce: Reduce | None):
    """Per row of one chunk's logits (n, V), or (n, V/tp) of this rank's rows `start`.. of the vocabulary
    under `reduce`: the log-sum-exp over the whole vocabulary (n,), the target's logit (n,), and where the
    targets are in `logits` (rows, cols, and `mine`: 1 where this rank holds the target, 0 elsewhere)."""
    rows = torch.arange(len(t), device=logits.device)
    if reduce is None:
        return logits.logsumexp(-1), logits[rows, t], rows, t, 1.0
    peak = logits.max(-1).values
    reduce(peak, "max")
    sumexp = (logits - peak[:, None]).exp_().sum(-1)
    reduce(sumexp, "sum")
    # the targets this rank's rows hold (no boolean indexing: fake tensors cannot size its output)
    local = t - start
    mine = ((local >= 0) & (local < logits.shape[1])).float()
    cols = local.clamp(0, max(logits.shape[1] - 1, 0))
    target = logits[rows, cols] * mine
    reduce(target, "sum")
    return peak + sumexp.log(), target, rows, cols, mine


class ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over chunks of rows, with the gradients made in forward (see the module doc).

    `reduce` (None on one device): the weight holds vocabulary rows `start`.. of a vocabulary split over
    ranks (txlab.parallel.tp), and `reduce` combines each chunk's row maxima, sums of exponentials and
    target logits over them; the weight's gradient is then this rank's rows' (exact), the hidden states'
    a partial sum over its rows (the caller reduces it). No rank holds more than chunk x its rows' logits."""

    @staticmethod
    def forward(ctx, h, weight, t, chunk: int, scale: float, start: int = 0, reduce: Reduce | None = None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        mm = _matmul_dtype(h)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = h.new_zeros((), dtype=torch.float32)
        w_mm = weight.to(mm)
        for s in range(0, h.shape[0], chunk):
            hs, ts = h[s : s + chunk], t[s : s + chunk]
            logits = F.linear(hs.to(mm), w_mm).float()  # (n, V), or this rank's (n, V/tp)
            lse, target, rows, cols, mine = _scores(logits, ts, start, reduce)
            total += (lse - target).sum()  # cross-entropy: log-sum-exp - target logit
            # d(sum CE)/d logits = softmax - one-hot, in the logits' own storage; times the mean's 1/N
            g = logits.sub_(lse[:, None]).exp_()
            g[rows, cols] -= mine
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
            del logits, lse, target, g
        ctx.save_for_backward(*(x for x in (dh, dw) if x is not None))
        ctx.has = (need_h, need_w)
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        dh = next(saved).mul_(grad) if ctx.has[0] else None
        dw = next(saved).mul_(grad) if ctx.has[1] else None
        return dh, dw, None, None, None, None, None


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    h = hidden.flatten(0, 1)  # (B*T, C)
    t = targets.flatten()
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(h, weight, t, chunk, 1.0 / h.shape[0])
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
