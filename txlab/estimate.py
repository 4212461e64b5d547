"""Predict a trial's peak memory without paying for it: the real training step on fake tensors.

`estimate_trial(cfg)` builds the trial exactly as `run_trial` does (`build_trial`: model, policy,
AdamW, step, data) but under torch's FakeTensorMode, so every tensor has a shape, dtype and device
and no storage. The same `MemoryMonitor` (torch's MemTracker) watches the same `MEMORY_STEPS`
steps and reports the same breakdown as a measured row. No formula is involved: every attention
kernel, recomputation policy and loss mode is covered because the real code runs.

Targets:
- `cpu`: the peak of the live-tensor tracker, which is what a measured CPU row reports.
- `cuda`: the same run on fake CPU tensors (fake CUDA tensors need a CUDA build of torch), with
  three CUDA differences modelled: fused AdamW (as `make_optimizer` builds it on CUDA), bf16
  autocast on the CPU's autocast op lists (close to CUDA's for the ops in this model), and the
  caching allocator's rounding of each storage (`txlab.memory.cuda_block_bytes`). Not modelled:
  kernels' internal workspaces (cuBLAS, fused attention backward), which the CUDA allocator sees
  and the tracker does not, and block reuse that depends on allocation history; `reserved_bytes`
  is left empty. See docs/estimator.md.

`formula_activation_bytes(cfg)` is the closed form of Korthikanti et al. 2022, stored beside every
row (measured or estimated) so analysis can show where formulas and reality part.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from txlab.config import ConfigError, TrialConfig
from txlab.memory import GiB, MemoryMonitor
from txlab.remat import segments

DEVICE_KINDS = ("cpu", "cuda")


# --- the closed form ------------------------------------------------------------------------------


def formula_activation_bytes(cfg: TrialConfig, plan_segments: list[tuple[int, int, bool]] | None = None) -> int | None:
    """Activation bytes of the transformer layers by Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", section 4), scaled to the trial.

    Per layer at 16 bits with dropout masks: s*b*h*(34 + 5*a*s/h) bytes, i.e. 32 sbh of 16-bit
    tensors + 2 sbh of 1-byte dropout masks, plus 4 a s^2 b of 16-bit scores and softmax output
    + a s^2 b of attention-dropout mask. Scaled here to:
    - dtype: 16-bit tensors take 4 bytes at fp32 (bf16 autocast keeps them at 2);
    - dropout: masks only when model.dropout > 0; txlab never drops attention probabilities, so the
      a s^2 b mask term is always left out;
    - attention: the s^2 terms only for `math` (materialized) attention; fused and chunked kernels
      keep no s x s tensor (the formula predates them);
    - recomputation (the paper's full recomputation): a recomputed run of layers keeps only its
      input, 2 sbh at 16 bits; `selective` is the paper's selective recomputation (no s^2 terms).
    Embeddings, the final norm and the logits are outside the formula (as in the paper). None for
    workloads other than training.
    """
    m, p, w = cfg.model, cfg.policy, cfg.workload
    if w.kind != "train":
        return None
    s, b, h, a = w.seq_len, w.batch_size, m.d_model, m.n_heads
    word = 2 if w.dtype == "bf16" else 4  # bytes of a "16-bit" tensor of the paper in this trial
    mask = 1 if m.dropout > 0 else 0
    linear = s * b * h * (32 * word // 2 + 2 * mask)
    quadratic = 4 * a * s * s * b * word // 2 if p.attention == "math" and p.remat != "selective" else 0
    full_layer = linear + quadratic
    layer_input = s * b * h * word
    runs = plan_segments if plan_segments is not None else _formula_segments(cfg)
    total = 0
    for start, stop, recomputed in runs:
        total += layer_input if recomputed else full_layer * (stop - start)
    return int(total)


def _formula_segments(cfg: TrialConfig) -> list[tuple[int, int, bool]]:
    p, L = cfg.policy, cfg.model.n_layers
    if p.remat == "selective":  # the paper's selective recomputation keeps every layer's linear terms
        return [(0, L, False)]
    if p.remat == "planned":
        return [(0, L, False)]  # replaced by the plan's own runs where a plan exists
    return segments(L, p.remat, p.remat_every)


def plan_segments(plan: list[tuple[int, int, str]] | None) -> list[tuple[int, int, bool]] | None:
    """A plan's runs in the formula's terms: `full` runs keep their input only; `keep` and `selective`
    blocks keep the linear terms (the paper's selective recomputation)."""
    if plan is None:
        return None
    return [(a, b, mode == "full") for a, b, mode in plan]


# --- the estimator --------------------------------------------------------------------------------


def _device_kind(cfg: TrialConfig, device_kind: str | None) -> str:
    if device_kind is None:
        dev = cfg.measure.device
        if dev == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return "cuda" if dev.startswith("cuda") else "cpu"
    if device_kind not in DEVICE_KINDS:
        raise ConfigError(f"device kind {device_kind!r}: allowed: {', '.join(DEVICE_KINDS)}")
    return device_kind


def _default_capacity(kind: str) -> tuple[str, int | None]:
    if kind == "cuda":
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.name, int(props.total_memory)
        return "cuda", None
    import psutil

    return "cpu", int(psutil.virtual_memory().total)


def _make_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state now, as its first step would (one step on zero gradients; the values are
    fake anyway), and drop the gradients again, as `make_step` does before each step."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fake_step_memory(cfg: TrialConfig, kind: str = "cpu", plan: list[tuple[int, int, str]] | None = None,
                     steady: bool = True) -> tuple[dict[str, Any], Any]:
    """Run `build_trial` and its steps on fake tensors under the MemoryMonitor.

    A measured trial watches `MEMORY_STEPS` = 2 steps because AdamW makes its state lazily in the
    first: the second step is the steady state, with the state alive throughout, and it holds the
    peak. `steady=True` makes the state before the window and watches that one steady step (half the
    dispatched ops: most of the estimator's time); `steady=False` replays the measured run's steps
    exactly. The tests hold the two to the same figures.

    Returns the monitor's figures (as a row fragment) and the built model (fake), so callers can
    read parameter counts. Allocates only the tracker's bookkeeping.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from txlab.trial import MEMORY_STEPS, build_trial

    cpu = torch.device("cpu")
    with FakeTensorMode(allow_non_fake_inputs=False):
        parts = build_trial(cfg, cpu, fused_optimizer=kind == "cuda", plan=plan)
        if steady:
            _make_optimizer_state(parts.optimizer)
        batches = [parts.data.next() for _ in range(MEMORY_STEPS)]  # all alive in the window, as measured
        inputs = [t for b in batches for t in b]
        with MemoryMonitor(cpu, parts.model, parts.optimizer, inputs, None, cuda_accounting=kind == "cuda") as monitor:
            for x, y in batches[-1:] if steady else batches:
                parts.step(x, y)
                monitor.end_step()
        del batches, inputs
        stats = monitor.stats().as_row()
    if kind == "cuda":
        stats["reserved_bytes"] = None  # the caching allocator's segments depend on history: not modelled
    return stats, parts.model


def refuse_inference(cfg: TrialConfig) -> None:
    """The estimator models training steps only: a prefill / decode trial is bad input here."""
    if cfg.workload.kind != "train":
        raise ConfigError(f"workload.kind: txlab estimate predicts training steps only, got {cfg.workload.kind!r}; "
                          "allowed: train (measure prefill/decode with txlab run)")


def estimate_trial(cfg: TrialConfig, device_kind: str | None = None, capacity_bytes: int | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """The row `run_trial(cfg)` would produce, predicted on fake tensors: `measured = False`, memory
    figures filled, time figures empty. Status `ok`, or `over_budget` when the predicted peak is over
    `measure.budget_gib` or over `capacity_bytes` (when given); never raises for a failing trial
    (`error` row), only for bad input (ConfigError)."""
    from txlab.throughput import flops_per_token
    from txlab.trial import base_row

    refuse_inference(cfg)
    t0 = time.perf_counter()
    kind = _device_kind(cfg, device_kind)
    row = base_row(cfg)
    row["measured"] = False
    row["device"], default_capacity = _default_capacity(kind)
    row["device_capacity_bytes"] = capacity_bytes if capacity_bytes is not None else default_capacity
    m, w = cfg.model, cfg.workload
    try:
        plan = None
        if cfg.policy.remat == "planned":
            from txlab.planner import NoFeasiblePlan, plan_trial

            try:
                chosen = plan_trial(cfg, kind)
            except NoFeasiblePlan as e:
                row.update(status="over_budget", error=str(e), peak_bytes=e.smallest_bytes, plan=e.plan.describe())
                row["duration_s"] = time.perf_counter() - t0
                return row
            plan, row["plan"] = chosen.runs, chosen.describe()
        stats, model = fake_step_memory(cfg, kind, plan)
        row.update(stats)
        row["n_params"] = model.num_params()
        row["flops_per_token"] = flops_per_token(model.num_non_embedding_params(), m.n_layers, m.n_heads,
                                                 m.d_model // m.n_heads, w.seq_len)
        row["formula_activation_bytes"] = formula_activation_bytes(cfg, plan_segments(plan))
        row["status"] = "ok"
        budget = None if cfg.measure.budget_gib is None else int(cfg.measure.budget_gib * GiB)
        if budget is not None and row["peak_bytes"] > budget:
            row.update(status="over_budget",
                       error=f"predicted peak {row['peak_bytes'] / GiB:.3f} GiB over the budget of {budget / GiB:.3f} GiB")
        elif capacity_bytes is not None and row["peak_bytes"] > capacity_bytes:
            row.update(status="over_budget",
                       error=f"predicted peak {row['peak_bytes'] / GiB:.3f} GiB over the capacity of {capacity_bytes / GiB:.3f} GiB")
    except Exception as e:  # noqa: BLE001 - like run_trial: a failing trial is a row, not a crash
        row.update(status="error", error=f"{e.__class__.__name__}: {e}"[:2000])
    row["duration_s"] = time.perf_counter() - t0
    return row


# --- command line ---------------------------------------------------------------------------------


def cmd_estimate(args: argparse.Namespace) -> int:
    """`txlab estimate CONFIG [--set ...] [--capacity-gib N] [--json]`."""
    from txlab.config import load_config
    from txlab.report import format_row

    cfg = load_config(args.config, args.overrides)
    if args.capacity_gib is not None and not args.capacity_gib > 0:
        raise ConfigError(f"--capacity-gib: must be > 0, got {args.capacity_gib}")
    capacity = None if args.capacity_gib is None else int(args.capacity_gib * GiB)
    row = estimate_trial(cfg, capacity_bytes=capacity)
    if args.json:
        print(json.dumps(row, default=str))
    else:
        print("estimate (fake tensors, nothing run; figures are predictions)")
        print(format_row(row))
        if row.get("formula_activation_bytes") is not None:
            print(f"formula   Korthikanti et al. 2022 activations {row['formula_activation_bytes'] / GiB:.3f} GiB"
                  f"  (estimated {row['activations_bytes'] / GiB:.3f} GiB)" if row.get("activations_bytes") is not None else "")
        if row.get("plan"):
            print(f"plan      {row['plan']}")
        if capacity is not None:
            print(f"capacity  {capacity / GiB:g} GiB: {'fits' if row['status'] == 'ok' else row['status']}")
    return 1 if row["status"] == "error" else 0


# --- before a measured trial ------------------------------------------------------------------------


def free_bytes(kind: str, device: str = "auto") -> int | None:
    """Memory the machine has free for a trial now: available RAM (CPU), free memory of the CUDA device
    `device` names (`measure.device`; the current one for auto/cuda)."""
    if kind == "cuda":
        if not torch.cuda.is_available():
            return None
        index = int(device[5:]) if device.startswith("cuda:") else torch.cuda.current_device()
        return int(torch.cuda.mem_get_info(index)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def precheck(cfg: TrialConfig) -> dict[str, Any] | None:
    """The estimate's row when the trial is predicted over its budget or over the memory free now (on
    CPU an allocation past RAM may end the process instead of raising), else None: run it.

    A `planned` trial is not prechecked here: its planner already checks its plan with the estimator.
    """
    if cfg.policy.remat == "planned" or cfg.workload.kind != "train":  # inference: not modelled, run it
        return None
    kind = _device_kind(cfg, None)
    row = estimate_trial(cfg, kind, capacity_bytes=free_bytes(kind, cfg.measure.device))
    row["device_capacity_bytes"] = _default_capacity(kind)[1]  # the device's memory, not what was free
    if row["status"] == "over_budget":
        if "capacity" in (row["error"] or ""):
            row["error"] = row["error"].replace("over the capacity of", "over the memory free now,") + " (not run)"
        else:
            row["error"] += " (not run)"
        return row
    return None
