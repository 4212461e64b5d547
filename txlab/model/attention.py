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


# A tile of queries is (r, g, t): the query rows r .. r + t of q, at positions g .. g + t of the sequence k and
# v hold, so that they see keys 0 .. g + t causally. One sequence: r == g. Context parallelism (txlab.parallel.cp)
# passes a rank's own rows (two chunks of the sequence) at their global positions, with every rank's keys.


def _fused_forward(q, k, v, tiles: list[tuple[int, int, int]], scale: float):
    """Output (B, H, Tq, D) and row log-sum-exp (B, H, Tq) fp32, a q tile at a time through the fused kernel."""
    B, H, T, D = q.shape
    out = _bthd(B, H, T, D, q, q.dtype)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device).transpose(1, 2)
    for r, g, t in tiles:
        rows, own = slice(r, r + t), slice(g, g + t)
        qi = q[:, :, rows]
        o, m = _CPU_FLASH(qi, k[:, :, own], v[:, :, own], 0.0, True, scale=scale)  # the tile's own keys
        if g == 0:
            out[:, :, rows], lse[:, :, rows] = o, m
            continue
        o_b, m_b = _CPU_FLASH(qi, k[:, :, :g], v[:, :, :g], 0.0, False, scale=scale)  # the keys before it
        new = torch.logaddexp(m_b, m)
        w_b, w = (m_b - new).exp_().unsqueeze(-1), (m - new).exp_().unsqueeze(-1)
        if q.dtype == torch.float32:
            dst = out[:, :, rows]
            torch.mul(o_b, w_b, out=dst)
            dst.addcmul_(o, w)
        else:
            out[:, :, rows] = o_b.float() * w_b + o.float() * w
        lse[:, :, rows] = new
        del o, m, o_b, m_b, new, w_b, w
    return out, lse


def _fused_backward(grad_out, q, k, v, out, lse, tiles: list[tuple[int, int, int]], scale: float):
    """dq, dk, dv: the share of each call of the forward, from the fused backward given the final output
    and log-sum-exp."""
    B, H, T, D = q.shape
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq = _bthd(B, H, T, D, q, q.dtype)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for r, g, t in tiles:
        rows, own = slice(r, r + t), slice(g, g + t)
        args = (grad_out[:, :, rows], q[:, :, rows])
        saved = (out[:, :, rows], lse[:, :, rows], 0.0)
        gq, gk, gv = _CPU_FLASH_BWD(*args, k[:, :, own], v[:, :, own], *saved, True, scale=scale)
        dk[:, :, own] += gk
        dv[:, :, own] += gv
        if g == 0:
            dq[:, :, rows] = gq
            continue
        gq_b, gk_b, gv_b = _CPU_FLASH_BWD(*args, k[:, :, :g], v[:, :, :g], *saved, False, scale=scale)
        torch.add(gq_b, gq, out=dq[:, :, rows])
        dk[:, :, :g] += gk_b
        dv[:, :, :g] += gv_b
        del gq, gk, gv, gq_b, gk_b, gv_b
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _ops_forward(q, k, v, tiles: list[tuple[int, int, int, list[int]]], k_chunk: int, scale: float):
    """The `ops` body's forward over tiles (r, g, t, key tile starts): output (B, H, Tq, D), log-sum-exp."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qg = q.reshape(B, Hkv, G, T, D)
    out = torch.empty(B, Hkv, G, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hkv, G, T, dtype=torch.float32, device=q.device)
    for r, g, t, k_starts in tiles:
        qi = qg[..., r : r + t, :]
        row_max = torch.full(qi.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(qi.shape, dtype=torch.float32, device=q.device)
        for k0 in k_starts:
            k1 = min(k0 + k_chunk, g + t)
            s = _tile_scores(qi, k[:, :, k0:k1], g, k0, scale)
            new_max = torch.maximum(row_max, s.amax(dim=-1))
            p = torch.exp(s - new_max.unsqueeze(-1))
            correction = torch.exp(row_max - new_max)
            row_sum = row_sum * correction + p.sum(dim=-1)
            acc = acc * correction.unsqueeze(-1) + p.to(v.dtype) @ v[:, :, k0:k1].unsqueeze(2)
            row_max = new_max
        out[..., r : r + t, :] = (acc / row_sum.unsqueeze(-1)).to(q.dtype)
        lse[..., r : r + t] = row_max + torch.log(row_sum)
    return out.reshape(B, H, T, D), lse


def _ops_backward(grad_out, q, k, v, out, lse, tiles: list[tuple[int, int, int, list[int]]], k_chunk: int, scale):
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qg = q.reshape(B, Hkv, G, T, D)
    dout = grad_out.reshape(B, Hkv, G, T, D)
    delta = (dout.float() * out.reshape(B, Hkv, G, T, D).float()).sum(dim=-1)  # (B, Hkv, G, T): rowsum(dO * O)
    dq = torch.zeros(qg.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for r, g, t, k_starts in tiles:
        qi, doi = qg[..., r : r + t, :], dout[..., r : r + t, :]
        lse_i, delta_i = lse[..., r : r + t].unsqueeze(-1), delta[..., r : r + t].unsqueeze(-1)
        for k0 in k_starts:
            k1 = min(k0 + k_chunk, g + t)
            kj, vj = k[:, :, k0:k1], v[:, :, k0:k1]
            p = torch.exp(_tile_scores(qi, kj, g, k0, scale) - lse_i)  # (B, Hkv, G, tq, tk)
            dv[:, :, k0:k1] += (p.transpose(-2, -1) @ doi.float()).sum(dim=2)
            dp = doi.float() @ vj.unsqueeze(2).transpose(-2, -1).float()
            ds = p * (dp - delta_i) * scale
            dq[..., r : r + t, :] += ds @ kj.unsqueeze(2).float()
            dk[:, :, k0:k1] += (ds.transpose(-2, -1) @ qi.float()).sum(dim=2)
    return dq.reshape(B, H, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def tiles_forward(body: str, q, k, v, tiles: list[tuple[int, int, int]], k_chunk: int):
    """Attention of the query tiles (r, g, t) of q against k and v (see above) with a resolved `body` ("fused"
    or "ops"), every tile computed: the output (B, H, Tq, D) and what `tiles_backward` takes (log-sum-exp)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if body == "fused":
        return _fused_forward(q, k, v, tiles, scale)
    return _ops_forward(q, k, v, _key_starts(tiles, k_chunk), k_chunk, scale)


def tiles_backward(body: str, grad_out, q, k, v, out, lse, tiles: list[tuple[int, int, int]], k_chunk: int):
    """dq, dk, dv of `tiles_forward`."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if body == "fused":
        return _fused_backward(grad_out, q, k, v, out, lse, tiles, scale)
    return _ops_backward(grad_out, q, k, v, out, lse, _key_starts(tiles, k_chunk), k_chunk, scale)


def _key_starts(tiles: list[tuple[int, int, int]], k_chunk: int) -> list[tuple[int, int, int, list[int]]]:
    return [(r, g, t, list(range(0, g + t, k_chunk))) for r, g, t in tiles]


class _ChunkedAttention(torch.autograd.Function):
    """Online-softmax attention over q_chunk x k_chunk tiles (FlashAttention's algorithm, in PyTorch ops).

    Forward keeps only q, k, v, the output and the per-row log-sum-exp; backward recomputes each tile's
    probabilities from them. No T x T tensor exists in either pass: memory is O(T * D + q_chunk * k_chunk).
    Grouped KV heads are handled by broadcasting q as (B, Hkv, G, T, D), so K/V are never repeated.
    """

    @staticmethod
    def forward(ctx, q, k, v, q_chunk: int, k_chunk: int, body: str = "auto"):
        body = _resolve_body(body, q)
        T, fake = q.shape[2], _is_fake(q)
        if body == "fused":
            tiles = [(q0, q0, q1 - q0) for q0, q1, _ in _fused_tiles(T, q_chunk, fake)]
        else:
            tiles = [(q0, q0, q1 - q0, starts) for q0, q1, starts in _tiles(T, q_chunk, k_chunk, fake)]
        ctx.tiles, ctx.k_chunk, ctx.body = tiles, k_chunk, body
        scale = 1.0 / math.sqrt(q.shape[-1])
        if body == "fused":
            out, lse = _fused_forward(q, k, v, tiles, scale)
        else:
            out, lse = _ops_forward(q, k, v, tiles, k_chunk, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        scale = 1.0 / math.sqrt(q.shape[-1])
        if ctx.body == "fused":
            grads = _fused_backward(grad_out, q, k, v, out, lse, ctx.tiles, scale)
        else:
            grads = _ops_backward(grad_out, q, k, v, out, lse, ctx.tiles, ctx.k_chunk, scale)
        return (*grads, None, None, None)


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
