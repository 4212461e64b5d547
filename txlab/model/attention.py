"""Causal attention implementations, chosen by name (`policy.attention`) and set on the model from outside.

Every implementation maps q (B, H, T, D), k and v (B, Hkv, T, D) with H % Hkv == 0 to (B, H, T, D) and
computes the same function; the tests hold them to the `math` reference at fp32 tolerance. None of them
drops attention probabilities: the model's dropout sits on embeddings and residual branches, which is
what lets the fused, chunked and materialized kernels agree exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference: materializes T x T scores and a T x T causal mask."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's fused kernel (flash / memory-efficient / cuDNN, or the CPU flash kernel); no mask tensor."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def _tile_scores(qi: torch.Tensor, kj: torch.Tensor, q0: int, k0: int, scale: float) -> torch.Tensor:
    """Scores of a query tile against a key tile, fp32, future keys set to -inf.

    qi (B, Hkv, G, tq, D), kj (B, Hkv, tk, D) -> (B, Hkv, G, tq, tk)
    """
    s = (qi @ kj.unsqueeze(2).transpose(-2, -1)).float() * scale
    tq, tk = s.shape[-2], s.shape[-1]
    if k0 + tk - 1 > q0:  # the tile reaches past the diagonal
        qpos = torch.arange(q0, q0 + tq, device=s.device)
        kpos = torch.arange(k0, k0 + tk, device=s.device)
        s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    return s


# On fake tensors (txlab.measure.estimate) a tile's values do not exist, only its allocations, and a tile's
# allocations depend only on its kind: (query rows, key columns, masked or not). Each tile frees its
# temporaries before the next, and a q tile's own buffers depend only on its rows. So the estimator
# runs the first tile of each kind and skips the repeats: the same peak (tested against running every
# tile), in a handful of tiles per call instead of (T / chunk)^2 / 2.
SKIP_REPEATED_FAKE_TILES = True


def _tiles(T: int, q_chunk: int, k_chunk: int, fake: bool) -> Iterator[tuple[int, int, list[int]]]:
    """(q0, q1, [k0, ...]) per q tile; causal: key tiles up to the tile's last query. On fake tensors
    only the first tile of each kind, and no q tile whose key tiles were all seen."""
    seen: set[tuple[int, int, bool]] = set()
    for q0 in range(0, T, q_chunk):
        q1 = min(q0 + q_chunk, T)
        starts = []
        for k0 in range(0, q1, k_chunk):
            k1 = min(k0 + k_chunk, q1)
            kind = (q1 - q0, k1 - k0, k1 - 1 > q0)  # masked as in _tile_scores
            if fake and kind in seen:
                continue
            seen.add(kind)
            starts.append(k0)
        if starts:
            yield q0, q1, starts


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return SKIP_REPEATED_FAKE_TILES and is_fake(t)


class _ChunkedAttention(torch.autograd.Function):
    """Online-softmax attention over q_chunk x k_chunk tiles (FlashAttention's algorithm, in PyTorch ops).

    Forward keeps only q, k, v, the output and the per-row log-sum-exp; backward recomputes each tile's
    probabilities from them. No T x T tensor exists in either pass: memory is O(T * D + q_chunk * k_chunk).
    Grouped KV heads are handled by broadcasting q as (B, Hkv, G, T, D), so K/V are never repeated.
    """

    @staticmethod
    def forward(ctx, q, k, v, q_chunk: int, k_chunk: int):
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        scale = 1.0 / math.sqrt(D)
        qg = q.reshape(B, Hkv, G, T, D)
        out = torch.empty(B, Hkv, G, T, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, Hkv, G, T, dtype=torch.float32, device=q.device)
        for q0, q1, k_starts in _tiles(T, q_chunk, k_chunk, _is_fake(q)):
            qi = qg[..., q0:q1, :]
            row_max = torch.full(qi.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
            row_sum = torch.zeros_like(row_max)
            acc = torch.zeros(qi.shape, dtype=torch.float32, device=q.device)
            for k0 in k_starts:
                k1 = min(k0 + k_chunk, q1)
                s = _tile_scores(qi, k[:, :, k0:k1], q0, k0, scale)
                new_max = torch.maximum(row_max, s.amax(dim=-1))
                p = torch.exp(s - new_max.unsqueeze(-1))
                correction = torch.exp(row_max - new_max)
                row_sum = row_sum * correction + p.sum(dim=-1)
                acc = acc * correction.unsqueeze(-1) + p.to(v.dtype) @ v[:, :, k0:k1].unsqueeze(2)
                row_max = new_max
            out[..., q0:q1, :] = (acc / row_sum.unsqueeze(-1)).to(q.dtype)
            lse[..., q0:q1] = row_max + torch.log(row_sum)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.chunks = (q_chunk, k_chunk)
        return out.reshape(B, H, T, D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        q_chunk, k_chunk = ctx.chunks
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        scale = 1.0 / math.sqrt(D)
        qg = q.reshape(B, Hkv, G, T, D)
        dout = grad_out.reshape(B, Hkv, G, T, D)
        delta = (dout.float() * out.float()).sum(dim=-1)  # (B, Hkv, G, T): rowsum(dO * O)
        dq = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        for q0, q1, k_starts in _tiles(T, q_chunk, k_chunk, _is_fake(q)):
            qi, doi = qg[..., q0:q1, :], dout[..., q0:q1, :]
            lse_i, delta_i = lse[..., q0:q1].unsqueeze(-1), delta[..., q0:q1].unsqueeze(-1)
            for k0 in k_starts:
                k1 = min(k0 + k_chunk, q1)
                kj, vj = k[:, :, k0:k1], v[:, :, k0:k1]
                p = torch.exp(_tile_scores(qi, kj, q0, k0, scale) - lse_i)  # (B, Hkv, G, tq, tk)
                dv[:, :, k0:k1] += (p.transpose(-2, -1) @ doi.float()).sum(dim=2)
                dp = doi.float() @ vj.unsqueeze(2).transpose(-2, -1).float()
                ds = p * (dp - delta_i) * scale
                dq[..., q0:q1, :] += ds @ kj.unsqueeze(2).float()
                dk[:, :, k0:k1] += (ds.transpose(-2, -1) @ qi.float()).sum(dim=2)
        return dq.reshape(B, H, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def chunked_attention(q, k, v, q_chunk: int = 512, k_chunk: int = 512) -> torch.Tensor:
    return _ChunkedAttention.apply(q, k, v, q_chunk, k_chunk)


def get_attention(name: str, q_chunk: int = 512, k_chunk: int = 512) -> AttentionFn:
    match name:
        case "math":
            return math_attention
        case "sdpa":
            return sdpa_attention
        case "chunked":
            return functools.partial(chunked_attention, q_chunk=q_chunk, k_chunk=k_chunk)
        case _:
            raise ValueError(f"unknown attention {name!r}; known: math, sdpa, chunked")
