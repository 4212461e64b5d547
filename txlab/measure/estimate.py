"""Predict a trial's peak memory without paying for it: the real training step on fake tensors.

`estimate_trial(cfg)` builds the trial exactly as `run_trial` does (`build_trial`: model, policy,
AdamW, step, data) but under torch's FakeTensorMode, so every tensor has a shape, dtype and device
and no storage. The same `MemoryMonitor` (torch's MemTracker) watches the same `MEMORY_STEPS`
steps and reports the same breakdown as a measured row. No formula is involved: every attention
kernel, recomputation policy and loss mode is covered because the real code runs.

Targets:
- `cpu`: the peak of the live-tensor tracker, which is what a measured CPU row reports.
- `cuda`: the same run on fake CPU tensors (fake CUDA tensors need a CUDA build of torch), with
  three CUDA differences modelled: fused AdamW (as `make_adamw` builds it on CUDA), bf16
  autocast on the CPU's autocast op lists (close to CUDA's for the ops in this model), and the
  caching allocator's rounding of each storage (`txlab.measure.memory.cuda_block_bytes`). Not modelled:
  kernels' internal workspaces (cuBLAS, fused attention backward), which the CUDA allocator sees
  and the tracker does not, and block reuse that depends on allocation history; `reserved_bytes`
  is left empty. See docs/estimator.md.

`formula_activation_bytes(cfg)` is the closed form of Korthikanti et al. 2022, stored beside every
row (measured or estimated) so analysis can show where formulas and reality part."""

from __future__ import annotations

import time
from typing import Any

import torch

from txlab.config import ConfigError, TrialConfig
from txlab.measure.budget import budget_bytes, infeasible_plan_row, over_budget
from txlab.measure.fake import fake_step_memory
from txlab.measure.formula import formula_activation_bytes, plan_segments
from txlab.measure.planning import plan_trial
from txlab.policy.planner import NoFeasiblePlan

DEVICE_KINDS = ("cpu", "cuda")


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


def refuse_inference(cfg: TrialConfig) -> None:
    """The estimator models training steps only: a prefill / decode trial is bad input here."""
    if cfg.workload.kind != "train":
        raise ConfigError(
            f"workload.kind: txlab estimate predicts training steps only, got {cfg.workload.kind!r}; "
            "allowed: train (measure prefill/decode with txlab run)"
        )


def estimate_trial(
    cfg: TrialConfig, device_kind: str | None = None, capacity_bytes: int | None = None, progress: bool = False
) -> dict[str, Any]:
    """The row `run_trial(cfg)` would produce, predicted on fake tensors: `measured = False`, memory
    figures filled, time figures empty. Status `ok`, or `over_budget` when the predicted peak is over
    `measure.budget_gib` or over `capacity_bytes` (when given); never raises for a failing trial
    (`error` row), only for bad input (ConfigError)."""
    from txlab.measure.row import base_row
    from txlab.measure.throughput import flops_per_token

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
            try:
                chosen = plan_trial(cfg, kind)
            except NoFeasiblePlan as e:
                infeasible_plan_row(row, e)
                row["duration_s"] = time.perf_counter() - t0
                return row
            plan, row["plan"] = chosen.runs, chosen.describe()
        stats, model = fake_step_memory(cfg, kind, plan)
        row.update(stats)
        row["n_params"] = model.num_params()
        row["flops_per_token"] = flops_per_token(
            model.num_non_embedding_params(), m.n_layers, m.n_heads, m.attn_head_dim(), w.seq_len
        )
        row["formula_activation_bytes"] = formula_activation_bytes(cfg, plan_segments(plan))
        row["status"] = "ok"
        budget = budget_bytes(cfg.measure.budget_gib)
        if not over_budget(row, budget, predicted=True):
            over_budget(row, capacity_bytes, "capacity", predicted=True)
    except Exception as e:  # noqa: BLE001 - like run_trial: a failing trial is a row, not a crash
        row.update(status="error", error=f"{e.__class__.__name__}: {e}"[:2000])
    row["duration_s"] = time.perf_counter() - t0
    return row


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
