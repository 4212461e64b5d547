"""FSDP2 (`torch.distributed.fsdp.fully_shard`) applied to a built model from outside, as torchtitan's
parallelize does: recomputation has already wrapped the blocks (txlab.policy.apply_policy), then each
entry of `model.blocks` is sharded as one unit, then the root (embeddings, final norm, output projection).

Under `workload.dtype: bf16` parameters are gathered in bf16 and gradients reduced in fp32
(`MixedPrecisionPolicy`); the sharded master weights and AdamW state stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    """Where this process sits in a sharded trial."""

    rank: int
    world: int
    mesh: object  # torch.distributed.device_mesh.DeviceMesh over the `world` ranks


def apply_fsdp(
    model: torch.nn.Module, ranks: Ranks, dtype: str = "fp32", reshard_after_forward: bool = True
) -> torch.nn.Module:
    """Shard `model` in place over `ranks.mesh`: every block (or recomputed run of blocks), then the root.
    `dtype`: the workload's (bf16 gathers parameters in bf16)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bf16" else None, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=ranks.mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(model, mesh=ranks.mesh, mp_policy=mp)  # the root keeps its parameters gathered after forward
    return model


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a per-rank figure over the ranks (the global batch's loss from each rank's share)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def fake_ranks(world: int) -> Ranks:
    """Rank 0 of `world` on torch's fake process group, for estimates: collectives cost nothing and move
    nothing, so a step of rank 0 runs as on a real cluster of `world` devices. Build the mesh before
    entering FakeTensorMode (inside it, mesh creation fails on a data-dependent output)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    return Ranks(0, world, init_device_mesh("cpu", (world,)))


def close_ranks() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
