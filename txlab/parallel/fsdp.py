"""FSDP2 (`torch.distributed.fsdp.fully_shard`) applied to a built model from outside, as torchtitan's
parallelize does: recomputation has already wrapped the blocks (txlab.policy.apply.apply_policy), then each
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
    """Where this process sits in a sharded trial: rank `rank` of `world` on one mesh of fsdp x cp x tp ranks,
    tp innermost (ranks r // (cp tp) share a data-parallel place, ranks r % tp a TP group's places)."""

    rank: int
    world: int
    mesh: object  # torch.distributed.device_mesh.DeviceMesh: 1-D over the `world` ranks (tp, cp 1), else named dims
    tp: int = 1  # tensor-parallel ranks of a group
    cp: int = 1  # context-parallel ranks of a group (txlab.parallel.cp)
    dp_cp_mesh: object = None  # with cp > 1: the fsdp x cp ranks flattened, which FSDP2 shards over

    @property
    def fsdp(self) -> int:
        """Data-parallel ranks (each takes 1/fsdp of the global batch)."""
        return self.world // (self.tp * self.cp)

    @property
    def dp_rank(self) -> int:
        """This rank's place among the data-parallel ranks: which rows of the batch it takes."""
        return self.rank // (self.tp * self.cp)

    @property
    def shards(self) -> int:
        """Ranks FSDP2 shards parameters, gradients and AdamW state over: data- and context-parallel ones."""
        return self.fsdp * self.cp

    @property
    def dp_mesh(self):
        """The ranks FSDP2 shards over and reduces gradients across (`shards` of them)."""
        if self.cp > 1:
            return self.dp_cp_mesh
        return self.mesh if self.tp == 1 else self.mesh["fsdp"]

    @property
    def cp_mesh(self):
        return self.mesh["cp"]

    @property
    def tp_mesh(self):
        return self.mesh["tp"]


def make_ranks(rank: int, fsdp: int, tp: int, device_type: str, cp: int = 1) -> Ranks:
    """This rank's `Ranks` on a mesh of fsdp x cp x tp ranks (the process group already initialised), a dim
    for each degree above 1 besides fsdp. A layout of FSDP alone keeps the 1-D mesh it has always used."""
    from torch.distributed.device_mesh import init_device_mesh

    # DTensor caches sharding decisions by specs whose meshes compare equal across process groups (a mesh's
    # equality ignores its groups): a decision cached by an earlier trial in this process (an estimate, a sweep
    # rank's precheck) would send this mesh's collectives to that trial's destroyed groups ("Could not resolve
    # the process group registered under the name 3": a cp 2 x tp 2 estimate after tp 2, fsdp 2 x tp 2 and cp 2
    # ones; ranks 2 and 3 of a measured fsdp 2 x tp 2 after a precheck). A new mesh starts with none.
    torch._C._clear_DTensor_sharding_propagator_cache()
    dims = [("fsdp", fsdp)] + [(name, n) for name, n in (("cp", cp), ("tp", tp)) if n > 1]
    shape, names = tuple(n for _, n in dims), tuple(name for name, _ in dims)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names if len(dims) > 1 else None)
    flat = mesh["fsdp", "cp"]._flatten("dp_cp") if cp > 1 else None  # torchtitan's dp_shard_cp
    return Ranks(rank, fsdp * cp * tp, mesh, tp, cp, flat)


def apply_fsdp(
    model: torch.nn.Module, ranks: Ranks, dtype: str = "fp32", reshard_after_forward: bool = True
) -> torch.nn.Module:
    """Shard `model` in place over the data-parallel ranks (`ranks.dp_mesh`): every block (or recomputed run
    of blocks), then the root. `dtype`: the workload's (bf16 gathers parameters in bf16). With TP applied
    first, each parameter is a TP shard that FSDP2 shards further (a 2-D DTensor)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bf16" else None, reduce_dtype=torch.float32)
    from txlab.parallel.ep import shard_experts

    # expert parallelism's experts first, on their own mesh; those no further rank shares are left out
    ignored = shard_experts(model, reshard_after_forward=reshard_after_forward, mp_policy=mp) or None
    for block in model.blocks:
        fully_shard(
            block, mesh=ranks.dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp, ignored_params=ignored
        )
    # the root keeps its parameters gathered after forward
    fully_shard(model, mesh=ranks.dp_mesh, mp_policy=mp, ignored_params=ignored)
    return model


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a per-rank figure over the ranks (the global batch's loss from each rank's share)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def fake_ranks(fsdp: int, tp: int = 1, cp: int = 1) -> Ranks:
    """Rank 0 of fsdp x cp x tp on torch's fake process group, for estimates: collectives cost nothing and move
    nothing, so a step of rank 0 runs as on a real cluster of that many devices. Build the mesh before
    entering FakeTensorMode (inside it, mesh creation fails on a data-dependent output)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=fsdp * cp * tp, store=FakeStore())
    return make_ranks(0, fsdp, tp, "cpu", cp)


def close_ranks() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
