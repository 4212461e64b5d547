"""The real training step on fake tensors: `build_trial` and its steps under FakeTensorMode and the same
MemoryMonitor as a measured trial, so every kernel, recomputation policy and loss is covered by running
its code, with nothing allocated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from txlab.measure.memory import measure_steps
from txlab.measure.records import Memory, Routing
from txlab.model.attention import chunked_tile_body
from txlab.parallel.ep import assume_routing
from txlab.parallel.fsdp import Ranks, close_ranks, fake_ranks
from txlab.trial.build import MEMORY_STEPS, build_trial
from txlab.trial.resolve import Setup


def assumed_routing(setup: Setup) -> Routing | None:
    """What an estimated row says of a mixture of experts' routing: the assumption its expert-parallel ranks
    received rows by (`workload.routing_imbalance`; on one rank no shape depends on it). None: a dense model."""
    if setup.model.mlp != "moe":
        return None
    f = setup.workload.routing_imbalance
    return Routing("balanced" if f == 1.0 else f"imbalance {f:g}")


def make_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state now, as its first step would (one step on zero gradients; the values are
    fake anyway), and drop the gradients again, as `make_step` does before each step."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def settle_fsdp(model: torch.nn.Module) -> None:
    """FSDP2's root finishes its setup in the first forward (its lazy init: every parameter's sharded storage reset,
    op by op, before the first block runs), as in the measured trial's first step; the steady step the estimator
    watches is the measured second, after it. Done before the window so that the watched step is the same for every
    block (txlab.trial.extrapolate)."""
    state = getattr(model, "_get_fsdp_state", None)
    if state is not None:
        state()._lazy_init()


@contextmanager
def sharding_propagation_apart():
    """DTensor works out an op's output shape by running the op on fake tensors of the global shapes, in the
    fake mode that is active, else in a fresh one (`torch.distributed.tensor._sharding_prop`,
    `detect_fake_mode() or FakeTensorMode()`). In a measured trial that is a fresh mode, whose ops the tracker
    skips; in an estimate it would be the estimator's own, so the tracker would count those global-shape
    tensors as this rank's memory (under loss_parallel, whose handlers propagate on every call, a full-vocabulary
    copy of the logits). Inside this context DTensor makes its fresh mode in estimates too (torch 2.13's
    module attribute; the tests hold estimate and measured peak together)."""
    from torch.distributed.tensor import _sharding_prop

    detect = _sharding_prop.detect_fake_mode
    _sharding_prop.detect_fake_mode = lambda *args, **kwargs: None
    try:
        yield
    finally:
        _sharding_prop.detect_fake_mode = detect


def fake_step_memory(
    setup: Setup,
    plan: list[tuple[int, int, str]] | None = None,
    steady: bool = True,
    wrap_step: Callable | None = None,
    on_op: Callable | None = None,
) -> tuple[Memory, torch.nn.Module]:
    """Run `build_trial` and its steps on fake tensors under the MemoryMonitor, for the device kind
    `setup.kind` (cuda: CUDA's fused AdamW and allocator rounding, on fake CPU tensors).

    A measured trial watches `MEMORY_STEPS` = 2 steps because AdamW makes its state lazily in the
    first: the second step is the steady state, with the state alive throughout, and it holds the
    peak. `steady=True` makes the state before the window and watches that one steady step (half the
    dispatched ops: most of the estimator's time); `steady=False` replays the measured run's steps
    exactly. The tests hold the two to the same figures.

    A sharded layout: rank 0 of fsdp x tp on torch's fake process group shaped like the mesh, the model
    split by TP and sharded by FSDP2 as in a measured sharded trial, under the same tracker (FSDPMemTracker
    with FSDP): one rank's figures for any N, at the cost of one.

    `wrap_step(step, optimizer) -> step`: what the watched steps run instead of the trial's step (the time
    model's operator trace, txlab.trial.predict, records the steady step this way, in the same run). `on_op(tracker)`:
    after every op of the watched steps (txlab.trial.extrapolate records the timeline of live memory).

    This is one run of every block; `txlab.trial.extrapolate.step_memory` (what estimates call) runs a few depths of
    a deep model this way and extrapolates.

    Returns the monitor's figures and the built model (fake), so callers can read parameter counts.
    Allocates only the tracker's bookkeeping.
    """
    setup = dataclasses.replace(setup, device=torch.device("cpu"), data=None)  # fake CPU tensors, synthetic tokens
    layout = setup.layout
    # the mesh before FakeTensorMode (FACTS)
    ranks = fake_ranks(layout.fsdp, layout.tp, layout.cp) if setup.sharded else None
    try:
        return _fake_step(setup, plan, steady, ranks, wrap_step, on_op)
    finally:
        if ranks is not None:
            close_ranks()


def _fake_step(
    setup: Setup, plan, steady: bool, ranks: Ranks | None, wrap_step: Callable | None = None, on_op=None
) -> tuple[Memory, torch.nn.Module]:
    cuda = setup.kind == "cuda"
    parts = None
    if ranks is not None and (ranks.tp > 1 or setup.layout.ep > 1):  # FACTS: built, sharded on meta, made fake
        mode = FakeTensorMode(allow_non_fake_inputs=True)  # the meshes' own (real) rank tensors
        parts = build_trial(setup, fused_optimizer=cuda, plan=plan, ranks=ranks, fake_mode=mode)
    else:
        mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode, sharding_propagation_apart():
        if parts is None:
            parts = build_trial(setup, fused_optimizer=cuda, plan=plan, ranks=ranks)
        assume_routing(parts.model, setup.workload.routing_imbalance)  # fake tensors hold no counts to route by
        if steady:
            settle_fsdp(parts.model)
            make_optimizer_state(parts.optimizer)
        batches = [parts.data.next() for _ in range(MEMORY_STEPS)]  # all alive in the window, as measured
        window = batches[-1:] if steady else batches
        earlier = [t for b in batches[:-1] for t in b] if steady else []  # alive in the steady step's window
        step = wrap_step(parts.step, parts.optimizer) if wrap_step is not None else parts.step
        with chunked_tile_body("ops" if cuda else "auto"):  # the tiles a CUDA run computes
            memory, _ = measure_steps(
                setup.device, parts.model, parts.optimizer, window, step, None, cuda,
                ranks is not None and ranks.shards > 1,
                held=earlier, hold_losses=False, on_op=on_op,
            )  # fmt: skip
        del batches, earlier, window
    if cuda:  # the caching allocator's segments depend on history: not modelled
        memory = dataclasses.replace(memory, reserved_bytes=None)
    return memory, parts.model
