"""Expert parallelism (EP) applied to a built GPT from outside, as torchtitan does: each mixture-of-experts
layer's routed experts are spread over `ep` ranks drawn from the data-parallel (FSDP) ranks, and the tokens
are sent to the rank that holds their expert and back with all-to-all.

The mesh (torchtitan's rule): the fsdp data-parallel ranks are laid out as (fsdp / ep, ep), ep innermost, so
an EP group is `ep` consecutive ranks. Rank r of an EP group holds experts r E/ep .. (r + 1) E/ep - 1 of every
layer, stored as DTensors of the whole (E, ...) shape placed Shard(0) on the EP dimension (so parameter counts
and gathered gradients read as on one device); FSDP2 then shards each rank's experts over the other
dimension, the fsdp / ep ranks that hold the same experts (`shard_experts`, called by
`txlab.parallel.fsdp.apply_fsdp` before the blocks, so the blocks' units leave the experts out). Everything
else (attention, router, shared experts, embeddings) is sharded by FSDP2 over all fsdp ranks as before.

A layer's step (`ExpertParallel.forward`, which replaces the experts' compute; the router, the sort by expert
and the weighted sum back into the tokens stay the model's own, `txlab.model.moe.MoE`):
1. each rank's (token, expert) rows arrive sorted by expert, so the rows for EP rank j are one contiguous run;
   the ranks exchange their per-expert counts (all-to-all of E integers), then the rows (all-to-all, with
   autograd: the backward is the reverse all-to-all);
2. the received rows, ordered by source rank then expert, are reordered by expert and go through this rank's
   E/ep experts in one grouped matmul each (`txlab.model.moe.swiglu_experts`);
3. the results are put back in the received order and returned by the reverse all-to-all.

Gradients: an expert's weight gradient sums the contributions of the tokens of all `ep` ranks of its group,
while each rank's loss is the mean over its own tokens; it is divided by ep, so that FSDP2's mean over the
remaining fsdp / ep ranks makes it the global batch's mean gradient, as for every other parameter.

Estimates (fake tensors) cannot read the counts, so the split sizes come from a stated routing assumption
(`assume_routing`: balanced, or the busiest expert `workload.routing_imbalance` times the mean, on this rank).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from txlab.model.moe import MoE, swiglu_experts


def expert_mesh(ranks, ep: int):
    """The (fsdp / ep, ep) mesh ("efsdp", "ep") over the data-parallel ranks of `ranks` (a
    `txlab.parallel.fsdp.Ranks` without TP or CP). Build it before entering FakeTensorMode."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(ranks.mesh.device_type, (ranks.fsdp // ep, ep), mesh_dim_names=("efsdp", "ep"))


def received_rows(sent: int, imbalance: float, ep: int, n_experts: int) -> int:
    """Rows rank 0 receives under the routing assumption when each rank sends `sent` (token, expert) rows:
    balanced, `sent` (each expert gets the mean m = ep sent / E); otherwise the busiest expert, on this rank,
    gets `imbalance` x m and the other E - 1 share the rest evenly, so this rank receives f m + (E/ep - 1)(E - f)
    m / (E - 1): `sent` on one rank (no shape depends on the routing there), f x `sent` with one expert a rank."""
    m, f, local = ep * sent / n_experts, imbalance, n_experts // ep
    return round(f * m + (local - 1) * (n_experts - f) * m / (n_experts - 1)) if n_experts > 1 else sent


def _even(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class ExpertParallel(nn.Module):
    """This rank's E/ep experts of one layer, called as the layer's `experts` (rows sorted by expert and the
    E end offsets in, each row through its expert out); see the module docstring."""

    def __init__(self, experts: nn.Module, mesh):
        super().__init__()
        from torch.distributed.tensor import DTensor, Shard

        ep_mesh = mesh["ep"]
        self.mesh, self.ep = mesh, ep_mesh.size()
        self.group = ep_mesh.get_group()
        self.n_experts = experts.fc.weight.shape[0]
        self.assumed_imbalance: float | None = None  # an estimate's routing assumption (`assume_routing`)
        n, r = self.n_experts // self.ep, ep_mesh.get_local_rank()
        self.fc, self.proj = experts.fc, experts.proj
        for linear in (self.fc, self.proj):  # a copy of this rank's experts (the whole tensor is then freed)
            local = linear.weight.detach()[r * n : (r + 1) * n].clone()
            linear.weight = nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False))

    def _splits(self, counts: torch.Tensor, received: torch.Tensor, rows: int) -> tuple[list[int], list[int]]:
        """Rows this rank sends to each EP rank and receives from each: the counts' (a host sync), or under
        an estimate the assumption's (fake tensors have no values)."""
        if self.assumed_imbalance is None:
            return counts.sum(dim=1).tolist(), received.sum(dim=1).tolist()
        got = received_rows(rows, self.assumed_imbalance, self.ep, self.n_experts)
        return _even(rows, self.ep), _even(got, self.ep)

    def forward(self, rows: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """rows (M, d_model) sorted by expert, offs (E,) end row of each expert's rows -> (M, d_model)."""
        from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd

        ep, n = self.ep, self.n_experts // self.ep
        counts = torch.diff(offs.to(torch.int64), prepend=offs.new_zeros(1, dtype=torch.int64))  # (E,)
        received = all_to_all_single(counts, None, None, self.group).view(ep, n)  # (source rank, my expert)
        send, recv = self._splits(counts.view(ep, n), received, rows.shape[0])
        got = all_to_all_single_autograd(rows, recv, send, self.group)  # (R, C): by source rank, then expert
        source_expert = torch.repeat_interleave(torch.arange(ep * n, device=rows.device), received.flatten(),
                                                output_size=sum(recv))  # fmt: skip
        order = ((source_expert % n) * ep + source_expert // n).argsort(stable=True)  # by expert, then source
        local_offs = received.sum(dim=0).cumsum(0).to(torch.int32)  # (E/ep,)
        out = swiglu_experts(got[order], local_offs, self._local(self.fc), self._local(self.proj))
        out = out[order.argsort()]  # back in the received order
        return all_to_all_single_autograd(out, send, recv, self.group)

    def _local(self, linear: nn.Module) -> torch.Tensor:
        """This rank's (E/ep, ...) weights (gathered by FSDP2 over the other ranks), their gradient / ep."""
        w = linear.weight
        w = w.to_local() if hasattr(w, "to_local") else w
        if w.requires_grad:
            w.register_hook(lambda g: g / self.ep)
        return w


def apply_ep(model: nn.Module, mesh) -> nn.Module:
    """Spread the routed experts of every MoE layer of `model` over `mesh["ep"]` (in place)."""
    for layer in model.modules():
        if isinstance(layer, MoE):
            layer.experts = ExpertParallel(layer.experts, mesh)
    return model


def shard_experts(model: nn.Module, **fsdp_kwargs) -> set[nn.Parameter]:
    """FSDP2 over each expert-parallel layer's other dimension ("efsdp": the ranks holding the same experts),
    before the blocks are sharded (their units then leave the experts out). Where ep is all the fsdp ranks
    nothing is left to shard them over: returns those experts' parameters, for the FSDP2 units to ignore (a
    unit of one rank would only add a gathered copy, and its hooks inside a selectively recomputed block
    break torch's recomputation, which replays the ops it saw)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    # FSDP2 warns at every forward that the unit returns a view (its pre-backward hook would be lost to an
    # in-place op on it); the MoE layer only reads the experts' output (a product, then index_add into new
    # memory), and tests/test_ep.py checks the gradients against one device
    warnings.filterwarnings(
        "ignore", message=r"FSDP2-wrapped module \(FSDPExpertParallel\) returned a view", category=UserWarning
    )
    ignored: set[nn.Parameter] = set()
    for module in model.modules():
        if isinstance(module, ExpertParallel):
            ranks, local = module.mesh["efsdp"].size(), module.n_experts // module.ep
            if ranks == 1:
                ignored.update(module.parameters())
                continue
            # fewer experts a rank than ranks to shard them over: split along dim 0 the extra ranks would hold
            # padding (rank 0 a whole expert); along the output rows instead, as torchtitan does
            place = (lambda p: Shard(1)) if ranks > local else None
            fully_shard(module, mesh=module.mesh["efsdp"], shard_placement_fn=place, **fsdp_kwargs)
    return ignored


def assume_routing(model: nn.Module, imbalance: float) -> None:
    """Route an estimate's expert-parallel layers by assumption (`received_rows`): fake tensors hold no counts."""
    for module in model.modules():
        if isinstance(module, ExpertParallel):
            module.assumed_imbalance = imbalance
