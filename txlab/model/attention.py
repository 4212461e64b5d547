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


# On fake tensors (txlab.trial.fake) a tile's values do not exist, only its allocations, and a tile's
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
# Two bodies compute the same function. `fused` (CPU): torch's fused CPU attention kernel per query tile
# (aten._scaled_dot_product_flash_attention_for_cpu and its backward, which take and give the row
# log-sum-exp): a q tile's rows against the keys before the tile (no mask) and against the tile's own keys
# (causal, top-left aligned), the two merged by their log-sum-exp; backward hands both calls the final
# output and log-sum-exp, so each yields exactly its share of dq, dk, dv. The kernel walks the keys in
# blocks of its own, so no call holds more than a q tile's rows of output at once: memory stays
# O(T * D + q_chunk * D), and k_chunk does not apply. `ops`: q_chunk x k_chunk tiles in PyTorch ops
# (scores, running max and sum), the readable form of the algorithm, for devices without that kernel.
# `auto` (the default): `fused` for CPU tensors (fake ones included), `ops` elsewhere. The estimator, which
# models CUDA on fake CPU tensors, selects `ops` for its CUDA figures (`chunked_tile_body`), since that is
# the body a CUDA run executes. The body is resolved when the kernel is called, so a recomputed block must
# be recomputed in the same setting (the estimator holds it over the whole step).
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


def _fused_tiles(T: int, q_chunk: int, fake: bool) -> list[tuple[int, int, list[tuple[int, int, int, bool]]]]:
    """(q0, q1, pieces) per q tile, each piece (r0, a, b, causal): query rows r0..q1 against keys a..b,
    `causal` meaning query r0 + i sees keys a .. a + i (exact top-left alignment: a == r0). On fake tensors,
    of each kind of tile (rows, whether keys precede it) only the last: a tile's allocations are its rows'
    outputs and, in backward, the gradients of the keys before it, so the last of a kind allocates most."""
    tiles = []
    for q0 in range(0, T, q_chunk):
        q1 = min(q0 + q_chunk, T)
        tiles.append((q0, q1, ([(q0, 0, q0, False)] if q0 else []) + [(q0, q0, q1, True)]))
    if not fake:
        return tiles
    last = {(q1 - q0, q0 > 0): (q0, q1, p) for q0, q1, p in tiles}
    return sorted(last.values())


def _bthd(B: int, H: int, T: int, D: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty (B, H, T, D) tensor laid out as (B, T, H, D), the fused kernel's own output layout (and the
    one the model's output projection reads without a copy)."""
    return torch.empty(B, T, H, D, dtype=dtype, device=like.device).transpose(1, 2)


def _fused_forward(q, k, v, q_chunk: int, scale: float):
    """Output (B, H, T, D) and row log-sum-exp (B, H, T) fp32, a q tile at a time through the fused kernel."""
    B, H, T, D = q.shape
    out = _bthd(B, H, T, D, q, q.dtype)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device).transpose(1, 2)
    for q0, q1, _ in _fused_tiles(T, q_chunk, _is_fake(q)):
        qi = q[:, :, q0:q1]
        o, m = _CPU_FLASH(qi, k[:, :, q0:q1], v[:, :, q0:q1], 0.0, True, scale=scale)  # the tile's own keys
        if q0 == 0:
            out[:, :, q0:q1], lse[:, :, q0:q1] = o, m
            continue
        o_b, m_b = _CPU_FLASH(qi, k[:, :, :q0], v[:, :, :q0], 0.0, False, scale=scale)  # the keys before it
        new = torch.logaddexp(m_b, m)
        w_b, w = (m_b - new).exp_().unsqueeze(-1), (m - new).exp_().unsqueeze(-1)
        if q.dtype == torch.float32:
            dst = out[:, :, q0:q1]
            torch.mul(o_b, w_b, out=dst)
            dst.addcmul_(o, w)
        else:
            out[:, :, q0:q1] = o_b.float() * w_b + o.float() * w
        lse[:, :, q0:q1] = new
        del o, m, o_b, m_b, new, w_b, w
    return out, lse


def _fused_backward(grad_out, q, k, v, out, lse, q_chunk: int, scale: float):
    """dq, dk, dv: the share of each call of the forward, from the fused backward given the final output
    and log-sum-exp."""
    B, H, T, D = q.shape
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq = _bthd(B, H, T, D, q, q.dtype)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for q0, q1, _ in _fused_tiles(T, q_chunk, _is_fake(q)):
        rows = slice(q0, q1)
        args = (grad_out[:, :, rows], q[:, :, rows])
        saved = (out[:, :, rows], lse[:, :, rows], 0.0)
        gq, gk, gv = _CPU_FLASH_BWD(*args, k[:, :, rows], v[:, :, rows], *saved, True, scale=scale)
        dk[:, :, rows] += gk
        dv[:, :, rows] += gv
        if q0 == 0:
            dq[:, :, rows] = gq
            continue
        gq_b, gk_b, gv_b = _CPU_FLASH_BWD(*args, k[:, :, :q0], v[:, :, :q0], *saved, False, scale=scale)
        torch.add(gq_b, gq, out=dq[:, :, rows])
        dk[:, :, :q0] += gk_b
        dv[:, :, :q0] += gv_b
        del gq, gk, gv, gq_b, gk_b, gv_b
    return dq, dk.to(k.dtype), dv.to(v.dtype)


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
            out, lse = _fused_forward(q, k, v, q_chunk, scale)
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
            return (*_fused_backward(grad_out, q, k, v, out, lse, q_chunk, scale), None, None, None)
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
