"""Context parallelism (CP) applied to a built GPT from outside: the sequence split over the `cp` ranks of a
group, attention over every rank's keys.

What a CP rank holds (causal load balancing, as torch's context_parallel and Megatron's CP do): the sequence
cut into 2 x cp equal chunks, rank i takes chunk i and chunk 2cp-1-i, so every rank has as many query-key
pairs under the causal mask as the others. Its tokens (inputs and targets) are those two chunks of its
data-parallel rows; every activation of a block is 1/cp of the sequence. Positions are the tokens' global
ones: the RoPE tables are cut to the rank's rows, learned positions are looked up at them.

Attention: a rank gathers the keys and values of its group (one all-gather of K|V a layer, Llama 3's
all-gather CP: with grouped KV heads K/V are a fraction of the activations) and attends its queries to the
keys up to each query's global position. It saves only its own K/V for backward and gathers them again
there; the keys' and values' gradients go back to the ranks that own them by one reduce-scatter (sum). The
exchange runs through torch's functional collectives (`_c10d_functional.all_gather_into_tensor` and
`_c10d_functional.reduce_scatter_tensor`), so it shows in an estimate's operator trace with its bytes.

Why not torch's `torch.distributed.tensor.experimental.context_parallel`: it dispatches SDPA's CUDA kernels
(flash / efficient / cuDNN) and their ring-rotated ops, and does not run on CPU over gloo, where txlab's
trials are tested. Each query tile is computed by txlab's own chunked online-softmax kernel
(txlab.model.attention.tiles_forward: the tile's earlier keys unmasked and its own chunk causal, merged by
their log-sum-exp: the inner loop of ring attention), which computes the same function as one device.

The loss is each rank's mean over its tokens; every rank has as many, so the mean over the ranks is the
global batch's. FSDP2 shards and reduces gradients over the flattened fsdp x cp ranks (torchtitan's
dp_shard_cp), whose mean of the ranks' gradients is the global batch's gradient.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from txlab.model.attention import _resolve_body, tiles_backward, tiles_forward
from txlab.model.gpt import Attention

# torch's functional collectives (what DTensor's tensor parallelism runs): ops that block the step where their
# output is read, unlike FSDP2's c10d collectives, which it overlaps; a time model reading the operator trace
# (txlab.timemodel.trace) tells them apart by namespace
_functional = torch.ops._c10d_functional


def chunk_starts(seq_len: int, cp: int, rank: int) -> tuple[int, int, int]:
    """(chunk length, global start of the rank's first chunk, of its second): chunks `rank` and 2cp-1-rank."""
    c = seq_len // (2 * cp)
    return c, rank * c, (2 * cp - 1 - rank) * c


def rank_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """The global positions of rank `rank`'s tokens, in the order it holds them: (seq_len / cp,)."""
    c, a, b = chunk_starts(seq_len, cp, rank)
    return torch.cat([torch.arange(a, a + c, device=device), torch.arange(b, b + c, device=device)])


class SequenceShard:
    """The trial's batches as a CP rank takes them: its two chunks of the sequence of its rows (x and y alike)."""

    def __init__(self, batches, cp: int, rank: int):
        self.batches, self.cp, self.rank = batches, cp, rank
        self.last_bytes = None  # bytes are counted per batch, not per chunk

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches.next()
        c, a, b = chunk_starts(x.shape[1], self.cp, self.rank)
        return tuple(torch.cat([t[:, a : a + c], t[:, b : b + c]], dim=1) for t in (x, y))


def _gather_kv(k: torch.Tensor, v: torch.Tensor, group, cp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's keys and values in sequence order, (B, Hkv, T, D) each, from each rank's (B, Hkv, 2c, D)."""
    B, Hkv, two_c, D = k.shape
    c = two_c // 2
    kv = torch.stack((k, v))  # (2, B, Hkv, 2c, D): one message
    got = _functional.wait_tensor(_functional.all_gather_into_tensor(kv, cp, group.group_name))  # (cp * 2, ...)
    got = got.view(cp, 2, B, Hkv, 2, c, D)  # (rank, k|v, B, Hkv, its first|second chunk, c, D)
    full = kv.new_empty(2, B, Hkv, 2 * cp, c, D)
    del kv
    for r in range(cp):
        full[:, :, :, r] = got[r, :, :, :, 0]
        full[:, :, :, 2 * cp - 1 - r] = got[r, :, :, :, 1]
    del got
    full = full.view(2, B, Hkv, 2 * cp * c, D)
    return full[0], full[1]


def _scatter_kv_grads(dk: torch.Tensor, dv: torch.Tensor, group, cp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's share of the gradients of the group's keys and values (B, Hkv, T, D), summed over the ranks
    whose queries read them: (B, Hkv, 2c, D) each, in the rank's chunk order."""
    B, Hkv, T, D = dk.shape
    c = T // (2 * cp)
    send = dk.new_empty(cp, 2, B, Hkv, 2, c, D)
    for i, g in enumerate((dk, dv)):
        g = g.view(B, Hkv, 2 * cp, c, D)
        for r in range(cp):
            send[r, i, :, :, 0] = g[:, :, r]
            send[r, i, :, :, 1] = g[:, :, 2 * cp - 1 - r]
    mine = _functional.reduce_scatter_tensor(send.view(cp * 2, B, Hkv, 2 * c, D), "sum", cp, group.group_name)
    mine = _functional.wait_tensor(mine)  # (2, B, Hkv, 2c, D)
    return mine[0], mine[1]


class _ContextParallelAttention(torch.autograd.Function):
    """This rank's queries (B, H, 2c, D) against the group's keys and values; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, tiles, k_chunk: int, body: str, group, cp: int):
        ctx.args = (tiles, k_chunk, _resolve_body(body, q), group, cp)
        full_k, full_v = _gather_kv(k, v, group, cp)
        out, lse = tiles_forward(ctx.args[2], q, full_k, full_v, tiles, k_chunk)
        ctx.save_for_backward(q, k, v, out, lse)  # the rank's own K/V: gathered again in backward
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        tiles, k_chunk, body, group, cp = ctx.args
        full_k, full_v = _gather_kv(k, v, group, cp)
        dq, dk, dv = tiles_backward(body, grad_out, q, full_k, full_v, out, lse, tiles, k_chunk)
        del full_k, full_v
        dk, dv = _scatter_kv_grads(dk, dv, group, cp)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def cp_tiles(local_len: int, cp: int, rank: int, q_tile: int) -> list[tuple[int, int, int]]:
    """The query tiles (local row, global position, rows) of a rank holding `local_len` = 2c tokens: each of
    its two chunks in tiles of `q_tile` rows."""
    c = local_len // 2
    _, a, b = chunk_starts(2 * cp * c, cp, rank)
    return [(r0 + u, g0 + u, min(q_tile, c - u)) for r0, g0 in ((0, a), (c, b)) for u in range(0, c, q_tile)]


def cp_attention(q, k, v, *, group, cp: int, rank: int, q_chunk: int | None, k_chunk: int | None, body: str):
    """Causal attention of this rank's two chunks of queries over the whole sequence's keys."""
    c = q.shape[2] // 2
    tiles = cp_tiles(2 * c, cp, rank, min(q_chunk or c, c))
    return _ContextParallelAttention.apply(q, k, v, tiles, k_chunk or 2 * cp * c, body, group, cp)


def attention_for(name: str, q_chunk: int, k_chunk: int, mesh) -> functools.partial:
    """The CP form of attention policy `name` on the CP `mesh` (1-D): `chunked` tiles the queries by
    q_chunk (k_chunk in the ops body); `sdpa` computes each chunk whole through torch's fused kernel (the CPU
    flash kernel sdpa runs, which gives the log-sum-exp the merge needs); `math` materializes each chunk's
    scores against all its keys (the reference)."""
    common = {"group": mesh.get_group(), "cp": mesh.size(), "rank": mesh.get_local_rank()}
    match name:
        case "chunked":
            return functools.partial(cp_attention, **common, q_chunk=q_chunk, k_chunk=k_chunk, body="auto")
        case "sdpa":
            return functools.partial(cp_attention, **common, q_chunk=None, k_chunk=None, body="auto")
        case "math":
            return functools.partial(cp_attention, **common, q_chunk=None, k_chunk=None, body="ops")
        case _:
            raise ValueError(f"unknown attention {name!r}; known: math, sdpa, chunked")


def apply_cp(model: nn.Module, mesh, policy, seq_len: int) -> None:
    """Make `model` (a GPT, the policy applied) one rank of the CP `mesh`: the policy's attention kernel in its
    CP form on every attention module, positions at the rank's global ones (see the module docstring)."""
    attn = attention_for(policy.attention, policy.q_chunk, policy.k_chunk, mesh)
    for module in model.modules():
        if isinstance(module, Attention):
            module.attn_fn = attn
    cp, rank = mesh.size(), mesh.get_local_rank()
    if model.wpe is not None:  # the model asks for positions 0 .. T/cp - 1: give the global ones
        # made on the index's device at each call: a TP estimate builds the model on the meta device, then runs it
        # on fake CPU tensors; prepended: under TP the plan's own hook makes the index a DTensor
        def global_positions(module, args):
            return (rank_positions(seq_len, cp, rank, device=args[0].device)[args[0]],)

        model.wpe.register_forward_pre_hook(global_positions, prepend=True)
    positions = rank_positions(seq_len, cp, rank, device=model.wte.weight.device)
    if getattr(model, "rope_cos", None) is not None:  # the rows of the rank's positions, in its order
        model.rope_cos = model.rope_cos[positions]
        model.rope_sin = model.rope_sin[positions]
