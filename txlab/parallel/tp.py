"""Tensor parallelism (TP) applied to a built GPT from outside, with torch's `torch.distributed.tensor.parallel`
plans, in torchtitan's order (`parallelize_llama`): TP here first, then recomputation wraps the blocks
(`txlab.policy.apply.apply_policy`), then FSDP2 shards over the data-parallel mesh dimension
(`txlab.parallel.fsdp.apply_fsdp`).

What each TP rank holds (Megatron's layout):
- attention: the fused q|k|v projection column-wise (each rank computes whole heads: H/tp query heads and
  Hkv/tp KV heads), the output projection row-wise (partial sums reduced after it);
- MLP: the up projection (gelu) or fused gate|up projection (swiglu) column-wise, the down projection row-wise;
- embeddings (token and learned positions) and the output projection split over their rows (the vocabulary,
  the positions), and the loss computed from vocabulary-sharded logits without gathering them: torch's
  `loss_parallel` for the full loss, the one-device chunked loss's fused cross-entropy
  (`txlab.policy.loss.ChunkedCrossEntropy`) over this rank's vocabulary rows, its per-row log-sum-exp and
  target logits all-reduced over the TP group, for the chunked one;
- with sequence parallelism (`parallel.sequence_parallel`, on by default) the residual stream and the norms
  are split over the sequence between the TP regions (all-gather before a region, reduce-scatter after it,
  instead of an all-reduce), so a rank holds 1/tp of the norms' and residual's activations.

Each rank takes 1/tp of the vocabulary rows by torch's chunk rule: a vocabulary tp does not divide (GPT-2's
50257) is sharded unevenly (the first ranks take one row more), with no padding and nothing changed in the
loss. KV heads are split, never replicated: tp must divide `model.n_kv_heads` (txlab.config refuses it).
The attention modules are told their local head counts (`n_heads // tp`), as torchtitan does.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from txlab.policy.loss import ChunkedCrossEntropy, LossFn


def row_order(sizes: list[int], tp: int) -> torch.Tensor:
    """The order of the rows of a fused projection whose output is `sizes` segments (q, k, v; or gate, up),
    each split evenly over `tp` ranks, such that rank r's contiguous 1/tp of the reordered rows is its
    share of every segment, in segment order: [q0 k0 v0 | q1 k1 v1 | ...].

    Why: a column-wise split (`ColwiseParallel`, Shard(0) of the weight) gives rank r the r-th contiguous
    block of rows. On the fused q|k|v rows as built, rank 0 of 2 would get all the query heads and none of
    the keys; reordered, it gets the first half of the query heads, of the KV heads and of the values, and
    its local output splits into q, k, v exactly as the one-device output does (with n_heads / tp heads).
    The same for swiglu's gate|up rows, whose local output `chunk(2)` must give matching gate and up halves.
    """
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    parts = []
    for r in range(tp):
        for start, n in zip(starts, sizes):
            share = n // tp
            parts.append(torch.arange(start + r * share, start + (r + 1) * share))
    return torch.cat(parts)


def fused_row_orders(cfg, tp: int) -> dict[str, torch.Tensor]:
    """Module name suffix -> `row_order` of each fused projection of a model config (`txlab.config.ModelConfig`)
    under `tp` ranks: `attn.qkv` always, `mlp.fc` for swiglu (gelu's up projection is one segment)."""
    D = cfg.attn_head_dim()
    orders = {"attn.qkv": row_order([cfg.n_heads * D, cfg.n_kv_heads * D, cfg.n_kv_heads * D], tp)}
    if cfg.mlp == "swiglu":
        orders["mlp.fc"] = row_order([cfg.mlp_width(), cfg.mlp_width()], tp)
    return orders


@torch.no_grad()
def _reorder_rows(linear: nn.Linear, order: torch.Tensor) -> None:
    for p in (linear.weight, linear.bias):
        if p is not None:
            p.copy_(p[order.to(p.device)])  # works on the meta device too (estimates build there)


def apply_tp(model: nn.Module, mesh, sequence_parallel: bool = True) -> nn.Module:
    """Split `model` (a `txlab.model.gpt.GPT`, before recomputation wraps its blocks) in place over the 1-D
    TP `mesh`; see the module docstring. Parameters become DTensors on `mesh`."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = mesh.size()
    orders = fused_row_orders(model.cfg, tp)
    between = Shard(1) if sequence_parallel else Replicate()  # the residual stream between TP regions (B, T, C)
    for block in model.blocks:
        _reorder_rows(block.attn.qkv, orders["attn.qkv"])
        if "mlp.fc" in orders:
            _reorder_rows(block.mlp.fc, orders["mlp.fc"])
        plan = {
            "attn.qkv": ColwiseParallel(),  # local output (B, T, (H + 2 Hkv) / tp * D): this rank's heads
            "attn.proj": RowwiseParallel(output_layouts=between),
            "mlp.fc": ColwiseParallel(),
            "mlp.proj": RowwiseParallel(output_layouts=between),
        }
        if sequence_parallel:  # norms on 1/tp of the sequence; the regions gather it first
            plan |= {
                "norm1": SequenceParallel(),
                "norm2": SequenceParallel(),
                "attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            }
        parallelize_module(block, mesh, plan)
        block.attn.n_heads //= tp  # the heads this rank computes (Attention.project splits by them)
        block.attn.n_kv_heads //= tp
    tied = model.lm_head.weight is model.wte.weight
    root = {"wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=between)}
    if model.wpe is not None:  # (T, C) rows of positions 0..T-1: split over the sequence as the tokens' are
        root["wpe"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(0) if sequence_parallel else Replicate()
        )
    if sequence_parallel:
        root["norm_f"] = SequenceParallel()
    if not tied:  # the module is never called (the loss takes its weight): this shards the weight's rows
        root["lm_head"] = ColwiseParallel()
    parallelize_module(model, mesh, root)
    if tied:  # parallelize_module replaced wte.weight by a sharded copy: tie the output projection to it again
        model.lm_head.weight = model.wte.weight
    return model


# --- the loss over vocabulary-sharded logits ------------------------------------------------------------


def _replicated(hidden: torch.Tensor, mesh):
    """The final hidden states (B, T, C) whole on every TP rank, a Replicate DTensor: gathered over the
    sequence under sequence parallelism (a DTensor Shard(1)), else the plain tensor every rank holds."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(hidden, DTensor):
        return hidden.redistribute(mesh, [Replicate()])
    return DTensor.from_local(hidden, mesh, [Replicate()], run_check=False)


def _replicated_local(hidden: torch.Tensor, mesh) -> torch.Tensor:
    """`_replicated` as a plain tensor whose gradient is this rank's partial sum (DTensor reduces the ranks'
    sums on the way back: a reduce-scatter to the sequence shards under sequence parallelism, an all-reduce
    without)."""
    from torch.distributed.tensor import Partial

    return _replicated(hidden, mesh).to_local(grad_placements=[Partial()])


def vocab_start(vocab: int, tp: int, rank: int) -> int:
    """The first vocabulary row rank `rank` of `tp` holds, by torch's chunk rule (DTensor's Shard(0))."""
    return min(rank * -(-vocab // tp), vocab)


def _all_reduce(t: torch.Tensor, op: str, group) -> None:
    """The vocabulary-parallel loss's reduction over the TP group (txlab.policy.loss.Reduce)."""
    dist.all_reduce(t, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)


def _full_loss(hidden, weight, targets, mesh) -> torch.Tensor:
    """torch's loss_parallel: logits sharded over the vocabulary (B, T, V/tp a rank), cross-entropy
    computed on the shards (the step runs under `torch.distributed.tensor.parallel.loss_parallel`)."""
    logits = F.linear(_replicated(hidden, mesh), weight)  # (B, T, V): Shard(2)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return loss.to_local()  # replicated: every rank holds the global loss


def _chunked_loss(hidden, weight, targets, mesh, chunk: int) -> torch.Tensor:
    h = _replicated_local(hidden, mesh).flatten(0, 1)  # (B*T, C)
    w = weight.to_local()  # (V/tp, C): this rank's vocabulary rows; its gradient stays Shard(0)
    start = vocab_start(weight.shape[0], mesh.size(), mesh.get_local_rank())
    t = targets.flatten()
    reduce = functools.partial(_all_reduce, group=mesh.get_group())
    return ChunkedCrossEntropy.apply(h, w, t, chunk, 1.0 / h.shape[0], start, reduce)


def tp_loss(name: str, loss_chunk: int, mesh) -> LossFn:
    """The loss `policy.loss` names, over vocabulary-sharded logits on the TP `mesh` (see the module doc)."""
    match name:
        case "full":
            return functools.partial(_full_loss, mesh=mesh)
        case "chunked":
            return functools.partial(_chunked_loss, mesh=mesh, chunk=loss_chunk)
        case _:
            raise ValueError(f"unknown loss {name!r}; known: full, chunked")


def loss_context():
    """What the training step (forward and backward) runs under for `_full_loss`: torch's loss_parallel."""
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()
