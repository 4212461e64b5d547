"""Planning a `planned` trial: profile one block on fake tensors, optimise the plan (the pure dynamic
programme of `txlab.policy.planner`), check it with the estimator (`txlab.trial.fake`).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from txlab.config import ModelConfig, PolicyConfig, WorkloadConfig
from txlab.measure.memory import charge_as_cuda, mem_tracker_cls
from txlab.model.attention import chunked_tile_body
from txlab.model.gpt import Block, rope_tables
from txlab.policy.apply import apply_policy
from txlab.policy.planner import RATES, BlockCost, NoFeasiblePlan, Plan, Run, model_peak, optimise, run_cost
from txlab.policy.remat import PLAN_MODES, SELECTIVE_POLICIES, Recomputed, segments
from txlab.runtime.progress import log
from txlab.trial.extrapolate import step_memory
from txlab.trial.resolve import Setup

# --- profiling a block on fake tensors --------------------------------------------------------------


def _recompute_seconds(block, x, rope, kind: str, autocast, save: str = "txlab") -> dict[str, float]:
    """Seconds to recompute the block in each mode: FLOPs and bytes written of the ops recomputed (in a
    selective run, the ops the `save` policy itself does not keep: asked as in a forward pass)."""
    from types import SimpleNamespace

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.checkpoint import CheckpointPolicy
    from torch.utils.flop_counter import flop_registry

    flops_per_s, bytes_per_s = RATES[kind]
    totals = {"keep": 0.0, "full": 0.0, "selective": 0.0}
    keeps, forward = SELECTIVE_POLICIES[save](), SimpleNamespace(is_recompute=False)

    class Cost(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            count = flop_registry.get(func._overloadpacket)
            flops = count(*args, **kwargs, out_val=out) if count is not None else 0
            written = sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            secs = flops / flops_per_s + written / bytes_per_s
            totals["full"] += secs
            if keeps(forward, func, *args, **kwargs) != CheckpointPolicy.MUST_SAVE:
                totals["selective"] += secs
            return out

    with Cost(), autocast():
        block(x, rope)
    return totals


def profile_block(m: ModelConfig, w: WorkloadConfig, p: PolicyConfig, kind: str = "cpu", layer: int = 0) -> BlockCost:
    """One block of the trial's model (block `layer`: a mixture of experts' dense and sparse layers differ), on
    fake tensors under the same tracker, in each mode."""
    tracker_cls, _ = mem_tracker_cls()
    kept, backward = {}, {}
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if w.dtype == "bf16" else nullcontext
    with (
        FakeTensorMode(),
        charge_as_cuda() if kind == "cuda" else nullcontext(),
        chunked_tile_body("ops" if kind == "cuda" else "auto"),  # the tiles a CUDA run computes
    ):
        block = Block(m, layer)
        apply_policy(block, dataclasses.replace(p, remat="none"))  # its kernel; the modes below wrap it
        rope = rope_tables(m, w.seq_len) if m.pos == "rope" else None
        grad_bytes = sum(q.numel() * q.element_size() for q in block.parameters())
        for mode in PLAN_MODES:
            wrapped = block if mode == "keep" else Recomputed([block], mode == "selective", p.selective_save)
            tracker = tracker_cls(None)
            tracker.track_external(wrapped, *(rope or ()))
            with tracker:
                params = _total(tracker)
                x = torch.empty(w.batch_size, w.seq_len, m.d_model, requires_grad=True)
                x_bytes = _total(tracker) - params
                with autocast():
                    y = wrapped(x, rope)
                y_bytes = _total(tracker) - params - x_bytes - 0  # y and what the graph keeps
                gy = torch.empty_like(y)
                base = _total(tracker)
                gy_bytes = base - params - x_bytes - y_bytes
                kept[mode] = max(0, y_bytes - gy_bytes)  # y has the size of gy: what is left is kept
                tracker._peak_mem = {}
                y.backward(gy)
                peak = max(tracker._peak_mem.values(), default=base)
                # in the chain nothing holds y here, and gy is the transient the block above leaves
                backward[mode] = gy_bytes + max(0, peak - base)
                del y, gy, x
        x = torch.empty(w.batch_size, w.seq_len, m.d_model)
        recompute = _recompute_seconds(block, x, rope, kind, autocast, p.selective_save)
    return BlockCost(x_bytes, kept, backward, grad_bytes, recompute)


def _total(tracker) -> int:
    return sum(s.get("Total", 0) for s in tracker._curr_mem_snap.values())


# --- planning a trial ---------------------------------------------------------------------------------


def plan_trial(setup: Setup, rounds: int = 4) -> Plan:
    """The plan for a `planned` trial on a device of kind `setup.kind`, checked by the estimator. Raises
    NoFeasiblePlan."""
    budget, L = setup.budget_bytes, setup.model.n_layers
    profiled: dict[bool, BlockCost] = {}  # one profile a kind of layer: dense, or mixture of experts
    for i in range(L):
        if setup.model.moe_layer(i) not in profiled:
            profiled[setup.model.moe_layer(i)] = profile_block(setup.model, setup.workload, setup.policy, setup.kind, i)
    blocks = [profiled[setup.model.moe_layer(i)] for i in range(L)]

    estimates: dict[tuple[Run, ...], int] = {}

    def estimate(runs: list[Run]) -> int:
        if tuple(runs) not in estimates:
            estimates[tuple(runs)] = step_memory(setup, runs)[0].peak_bytes  # deep: from a few depths
        return estimates[tuple(runs)]

    # calibrate the constant on the two extreme plans
    keep_all, full_all = [(0, L, "keep")], [(i, i + 1, "full") for i in range(L)]
    const = max(estimate(r) - model_peak(blocks, r) for r in (keep_all, full_all))
    target, found = budget, None
    for _ in range(rounds):
        plan = optimise(blocks, target, const)
        if plan is None:
            break
        plan.peak_bytes = estimate(plan.runs)
        if plan.peak_bytes <= budget:
            found = plan
            break
        target -= plan.peak_bytes - budget
    # The model's constant is the larger of the two calibration gaps, so it is pessimistic for middle
    # plans and can pass over a uniform heuristic that fits with less recomputation (gpt2-small at 1024
    # tokens: every block recomputed where every second one fits). The heuristics cheaper than the plan
    # are checked by the estimator, cheapest first, so `planned` never recomputes more than one that fits.
    for runs in sorted(_heuristics(L), key=lambda runs: round(_cost(blocks, runs), 12)):  # ties: list order
        # at equal cost the heuristic wins: per-block runs measured faster than the model's equal-cost
        # long runs (gpt2-small at 1024: every block 5.6 s, sqrt-like segments 6.6 s)
        if found is not None and _cost(blocks, runs) > found.cost_s * (1 + 1e-9):  # sums in other orders
            break
        if estimate(runs) <= budget:
            found = Plan(runs, _cost(blocks, runs), model_peak(blocks, runs, const), estimate(runs))
            break
    if found is not None:
        return found
    least = optimise(blocks, math.inf, const, objective="peak")
    assert least is not None
    least.peak_bytes = estimate(least.runs)
    # For the same reason the model can rank a mixed plan under recomputing every block when the
    # estimator (the truth here) ranks them the other way round (gpt2-small at 1024 tokens: 2.297 vs
    # 2.145 GiB); the least-memory plan is the one estimated least.
    full = Plan(full_all, _cost(blocks, full_all), model_peak(blocks, full_all, const), estimate(full_all))
    least = min((least, full), key=lambda plan: (plan.peak_bytes, plan.cost_s))
    if least.peak_bytes <= budget:  # the model was pessimistic; the least-memory plan fits
        return least
    raise NoFeasiblePlan(budget, least.peak_bytes, least)


def _cost(blocks: list[BlockCost], runs: list[Run]) -> float:
    return sum(run_cost(blocks, a, b, mode) for a, b, mode in runs)


def _heuristics(L: int) -> list[list[Run]]:
    """The uniform recomputation policies as plans: every block (full, selective), every k-th block
    (k = 2, 3, 4), sqrt(L) segments."""
    return [
        uniform_plan(L, remat, every)
        for remat, every in [("block", 1), ("selective", 1), ("sqrt", 1)] + [("every", k) for k in (2, 3, 4) if k < L]
    ]


def uniform_plan(L: int, remat: str, every: int = 1) -> list[Run]:
    """A uniform `policy.remat` (none, block, selective, sqrt, every k) as the runs of a plan."""
    mode = "selective" if remat == "selective" else "full"
    return [(a, b, mode if recomputed else "keep") for a, b, recomputed in segments(L, remat, every)]


def planned(setup: Setup, progress: bool = False) -> Plan | None:
    """The planner's plan for a `planned` trial (None for the other policies). Raises NoFeasiblePlan."""
    if setup.policy.remat != "planned":
        return None
    chosen = plan_trial(setup)
    log(progress, f"  plan: {chosen.describe()}")
    return chosen
