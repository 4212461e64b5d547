"""Causal attention implementations, chosen by name (`policy.attention`) and set on the model from outside.

Every implementation maps q (B, H, T, D), k and v (B, Hkv, T, D) with H % Hkv == 0 to (B, H, T, D) and
computes the same function; the tests hold them to the `math` reference at fp32 tolerance. None of them
drops attention probabilities: the model's dropout sits on embeddings and residual branches, which is
what lets the fused, chunked and materialized kernels agree exactly.
"""

from __future__ import annotations

import contextlib
import contextvars
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


# --- the tile body -----------------------------------------------------------------------------------
# Two bodies compute the same tiles. `fused`: each tile is one call of torch's fused CPU attention kernel
# (aten._scaled_dot_product_flash_attention_for_cpu and its backward), which returns the tile's output and
# row log-sum-exp; tiles are merged by their log-sum-exp (the online softmax at tile granularity), and the
# backward hands each tile the final output and log-sum-exp, so each call yields exactly that tile's share
# of dq, dk, dv. `ops`: the tile body written in PyTorch ops (scores, running max and sum), the readable
# form of the algorithm, for devices without that kernel. `auto` (the default): `fused` for CPU tensors
# (fake ones included), `ops` elsewhere. The estimator, which models CUDA on fake CPU tensors, selects
# `ops` for its CUDA figures (`chunked_tile_body`), since that is the body a CUDA run executes.
TILE_BODIES = ("auto", "fused", "ops")
_TILE_BODY: contextvars.ContextVar[str] = contextvars.ContextVar("txlab_chunked_tile_body", default="auto")


@contextlib.contextmanager
def chunked_tile_body(body: str):
    """Within the block, the chunked kernel computes its tiles with `body` (one of TILE_BODIES)."""
    if body not in TILE_BODIES:
        raise ValueError(f"unknown tile body {body!r}; known: {', '.join(TILE_BODIES)}")
    token = _TILE_BODY.set(body)
    try:
        yield
    finally:
        _TILE_BODY.reset(token)


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _resolve_body(body: str, q: torch.Tensor) -> str:
    body = _TILE_BODY.get() if body == "auto" else body
    if body == "auto":
        body = "fused" if q.device.type == "cpu" and _CPU_FLASH is not None else "ops"
    if body == "fused" and (q.device.type != "cpu" or _CPU_FLASH is None):
        raise ValueError(f"the fused tile body needs torch's CPU attention kernel; tensors on {q.device.type}")
    return body


def _subtiles(q0: int, q1: int, k0: int, k1: int) -> list[tuple[int, int, int, bool]]:
    """A tile as pieces the fused kernel computes without a mask: (r0, a, b, causal), query rows r0..q1
    against keys a..b, `causal` meaning query r0 + i sees keys a .. a + i (torch's top-left causal
    alignment, exact because a == r0). Rows above the tile's first key see none of it and are left out."""
    if k1 - 1 <= q0:  # every key at or before every query: no mask
        return [(q0, k0, k1, False)]
    if k0 >= q0:  # starts on or past the tile's first query: rows from k0 on, top-left causal
        return [(k0, k0, k1, True)]
    return [(q0, k0, q0, False), (q0, q0, k1, True)]  # straddles: the part below the diagonal, then causal


def _fused_tiles(T: int, q_chunk: int, k_chunk: int, fake: bool) -> Iterator[tuple[int, int, list[tuple]]]:
    """(q0, q1, [subtile, ...]) per q tile for the fused body. On fake tensors only the first subtile of each
    kind (q tile rows, subtile rows, keys, causal): a subtile's allocations depend only on that."""
    seen: set[tuple[int, int, int, bool]] = set()
    for q0 in range(0, T, q_chunk):
        q1 = min(q0 + q_chunk, T)
        pieces = []
        for k0 in range(0, q1, k_chunk):
            for r0, a, b, causal in _subtiles(q0, q1, k0, min(k0 + k_chunk, q1)):
                kind = (q1 - q0, q1 - r0, b - a, causal)
                if fake and kind in seen:
                    continue
                seen.add(kind)
                pieces.append((r0, a, b, causal))
        if pieces:
            yield q0, q1, pieces


def _fused_forward(q, k, v, q_chunk: int, k_chunk: int, scale: float):
    """Output (B, H, T, D) and row log-sum-exp (B, H, T) fp32, tile by tile through the fused kernel."""
    B, H, T, D = q.shape
    out = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    for q0, q1, pieces in _fused_tiles(T, q_chunk, k_chunk, _is_fake(q)):
        # running output and log-sum-exp of the q tile's rows (the output buffer itself in fp32)
        in_place = q.dtype == torch.float32
        acc = out[:, :, q0:q1] if in_place else out.new_empty(B, H, q1 - q0, D, dtype=torch.float32)
        acc.zero_()
        run = lse[:, :, q0:q1]
        run.fill_(float("-inf"))
        for r0, a, b, causal in pieces:
            o, m = _CPU_FLASH(q[:, :, r0:q1], k[:, :, a:b], v[:, :, a:b], 0.0, causal, scale=scale)
            acc_r, run_r = acc[:, :, r0 - q0 :], run[:, :, r0 - q0 :]
            new = torch.logaddexp(run_r, m)
            acc_r.mul_(torch.exp(run_r - new).unsqueeze(-1)).add_(o.float() * torch.exp(m - new).unsqueeze(-1))
            run_r.copy_(new)
            del o, m, new
        if not in_place:
            out[:, :, q0:q1] = acc
        del acc
    return out, lse


def _fused_backward(grad_out, q, k, v, out, lse, q_chunk: int, k_chunk: int, scale: float):
    """dq, dk, dv: each tile's share from the fused backward given the final output and log-sum-exp."""
    B, H, T, D = q.shape
    grad_out = grad_out.contiguous()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for _, q1, pieces in _fused_tiles(T, q_chunk, k_chunk, _is_fake(q)):
        for r0, a, b, causal in pieces:
            rows = slice(r0, q1)
            gq, gk, gv = _CPU_FLASH_BWD(
                grad_out[:, :, rows],
                q[:, :, rows],
                k[:, :, a:b],
                v[:, :, a:b],
                out[:, :, rows],
                lse[:, :, rows],
                0.0,
                causal,
                scale=scale,
            )
            dq[:, :, rows] += gq
            dk[:, :, a:b] += gk
            dv[:, :, a:b] += gv
            del gq, gk, gv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _ChunkedAttention(torch.autograd.Function):
    """Online-softmax attention over q_chunk x k_chunk tiles (FlashAttention's algorithm, in PyTorch ops).

    Forward keeps only q, k, v, the output and the per-row log-sum-exp; backward recomputes each tile's
    probabilities from them. No T x T tensor exists in either pass: memory is O(T * D + q_chunk * k_chunk).
    Grouped KV heads are handled by broadcasting q as (B, Hkv, G, T, D), so K/V are never repeated.
    """

    @staticmethod
    def forward(ctx, q, k, v, q_chunk: int, k_chunk: int, body: str = "auto"):
        body = _resolve_body(body, q)
        ctx.chunks, ctx.body = (q_chunk, k_chunk), body
        B, H, T, D = q.shape
        scale = 1.0 / math.sqrt(D)
        if body == "fused":
            out, lse = _fused_forward(q, k, v, q_chunk, k_chunk, scale)
            ctx.save_for_backward(q, k, v, out, lse)
            return out
        Hkv = k.shape[1]
        G = H // Hkv
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
        if ctx.body == "fused":
            return (*_fused_backward(grad_out, q, k, v, out, lse, q_chunk, k_chunk, scale), None, None, None)
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
        return dq.reshape(B, H, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


# Under torch.compile (workload.compile) the kernel runs as it is, between compiled graphs: its tile loop is
# already calls of fused kernels, tracing it would unroll (T / chunk)^2 / 2 tiles into the graph, and its
# fake-tensor tile skipping must never see dynamo's fake tensors.
@torch.compiler.disable
def chunked_attention(q, k, v, q_chunk: int = 512, k_chunk: int = 512, body: str = "auto") -> torch.Tensor:
    """Causal attention over q_chunk x k_chunk tiles; `body`: how a tile is computed (TILE_BODIES)."""
    return _ChunkedAttention.apply(q, k, v, q_chunk, k_chunk, body)


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
