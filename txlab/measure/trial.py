"""One measured trial in the current process: build, apply the policy, train a few steps, measure.

`workload.kind` prefill / decode trials are measured by `txlab.measure.inference.measure_inference` (same
monitor, same timing rules); this module dispatches to it.

`run_trial(cfg) -> row` never raises for out-of-memory or over-budget: those are statuses. Other
failures during the run become an `error` row with the message. Config errors are raised before
any work (the config is validated when it is built).

Order of steps: two steps under the memory monitor (the first creates the optimizer state, the
second is a steady-state step; the peak is taken over both), then `warmup_steps` untimed steps, then
`steps` timed steps (device synchronized around each; the median is reported)."""

from __future__ import annotations

import gc
import math
import statistics
import time
import traceback
from typing import Any

import torch

from txlab.config import TrialConfig
from txlab.data.batch import TrialBatches
from txlab.data.loader import Data, bits_per_byte, open_data
from txlab.data.synthetic import Synthetic
from txlab.measure.budget import BudgetExceeded, budget_bytes, infeasible_plan_row, over_budget, stopped_row
from txlab.measure.device import device_info, is_oom, resolve_device, sync
from txlab.measure.formula import formula_activation_bytes, plan_segments
from txlab.measure.inference import measure_inference
from txlab.measure.memory import MemoryMonitor, RssWindow
from txlab.measure.planning import plan_trial
from txlab.measure.progress import log
from txlab.measure.row import base_row
from txlab.measure.step import MEMORY_STEPS, TrialParts, build_trial
from txlab.measure.throughput import flops_per_token, mfu
from txlab.model.decode import context_length
from txlab.model.hf import check_pretrained
from txlab.policy.planner import NoFeasiblePlan


def trial_batches(cfg: TrialConfig, device: torch.device, real_data: Data | None) -> TrialBatches:
    """The trial's (x, y) stream: real text when the config reads some, else synthetic tokens (same shapes)."""
    m, w = cfg.model, cfg.workload
    split = real_data.train if real_data is not None else Synthetic(m.vocab_size, w.seq_len, w.batch_size, cfg.seed)
    return TrialBatches(split, device)


def _plan(cfg: TrialConfig, device: torch.device, row: dict[str, Any], progress: bool) -> list | None:
    """The planner's runs for a `planned` trial (None for the other policies). Raises NoFeasiblePlan."""
    if cfg.policy.remat != "planned":
        return None
    chosen = plan_trial(cfg, device.type)
    row["plan"] = chosen.describe()
    log(progress, f"  plan: {row['plan']}")
    return chosen.runs


def _memory_steps(parts: TrialParts, device: torch.device, budget: int | None, row: dict[str, Any], progress: bool):
    """The two monitored steps (AdamW's state is created in the first): the peak and its breakdown."""
    batches = [parts.data.next() for _ in range(MEMORY_STEPS)]
    inputs = [t for b in batches for t in b]
    try:
        with MemoryMonitor(device, parts.model, parts.optimizer, inputs, budget) as monitor:
            for i, (x, y) in enumerate(batches):
                loss = parts.step(x, y)
                monitor.end_step()
                log(progress, f"  memory step {i + 1}/{MEMORY_STEPS}  loss {loss.item():.4f}")
    finally:
        del batches, inputs
    row.update(monitor.stats().as_row())


def _timed_steps(
    parts: TrialParts, cfg: TrialConfig, device: torch.device, progress: bool
) -> tuple[list[float], float]:
    """`warmup_steps` untimed steps, then `steps` timed ones (device synchronized): their times, last loss."""
    w = cfg.workload
    for i in range(w.warmup_steps):
        parts.step(*parts.data.next())
        log(progress, f"  warm-up step {i + 1}/{w.warmup_steps}")
    times = []
    for i in range(w.steps):
        x, y = parts.data.next()
        sync(device)
        t0 = time.perf_counter()
        loss = parts.step(x, y)
        sync(device)
        times.append(time.perf_counter() - t0)
        log(progress, f"  timed step {i + 1}/{w.steps}  {times[-1]:.3f} s  loss {loss.item():.4f}")
    return times, float(loss.item())


def _measure_training(cfg: TrialConfig, device: torch.device, row: dict[str, Any], progress: bool, data) -> None:
    m, w = cfg.model, cfg.workload
    budget = budget_bytes(cfg.measure.budget_gib)
    try:
        plan = _plan(cfg, device, row, progress)
    except NoFeasiblePlan as e:
        infeasible_plan_row(row, e)
        return
    parts = build_trial(cfg, device, plan=plan, data=data)
    row["n_params"] = parts.model.num_params()
    row["flops_per_token"] = flops_per_token(
        parts.model.num_non_embedding_params(), m.n_layers, m.n_heads, m.attn_head_dim(), w.seq_len
    )
    row["formula_activation_bytes"] = formula_activation_bytes(cfg, plan_segments(plan))
    with RssWindow() as rss:
        try:
            _memory_steps(parts, device, budget, row, progress)
        except BudgetExceeded as e:
            stopped_row(row, e)
            return
        times, row["loss"] = _timed_steps(parts, cfg, device, progress)
    row["peak_rss_bytes"] = rss.peak if device.type == "cpu" else None
    row["step_time_s"] = statistics.median(times)
    row["tokens_per_s"] = w.batch_size * w.seq_len / row["step_time_s"]
    if device.type == "cuda":
        row["mfu"] = mfu(row["flops_per_token"], row["tokens_per_s"], row["device"], w.dtype)
    if parts.data.last_bytes is not None:  # real text: the same batch's loss over the bytes its targets cover
        row["bits_per_byte"] = bits_per_byte(row["loss"], w.batch_size * w.seq_len, parts.data.last_bytes)
    if not math.isfinite(row["loss"]):
        row.update(status="error", error=f"loss is {row['loss']}: training diverged")
        return
    if not over_budget(row, budget):
        row["status"] = "ok"


def _measure(cfg: TrialConfig, device: torch.device, row: dict[str, Any], progress: bool, real_data=None) -> None:
    budget = budget_bytes(cfg.measure.budget_gib)
    if device.type == "cuda" and budget is not None:
        # A real cap: allocations past the budget raise OutOfMemoryError, as on a smaller device.
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / row["device_capacity_bytes"]), device)
    data = trial_batches(cfg, device, real_data)
    if cfg.workload.kind in ("prefill", "decode"):  # no-grad forward (+ decode steps) under a KV policy
        measure_inference(cfg, device, row, progress, data)
    else:
        _measure_training(cfg, device, row, progress, data)


def run_trial(cfg: TrialConfig, progress: bool = False) -> dict[str, Any]:
    """Run one trial and return its flat result row (see docs/design.md and txlab.results.columns)."""
    t0 = time.perf_counter()
    row = base_row(cfg)
    device = resolve_device(cfg.measure.device)
    row["device"], row["device_capacity_bytes"] = device_info(device)
    # bad data or weights are a ConfigError here, before any work
    real_data = open_data(cfg) if cfg.data.source != "synthetic" else None
    if cfg.model.init == "pretrained":
        check_pretrained(cfg.model, context_length(cfg))
    log(
        progress,
        f"trial {row['trial_key']}: {cfg.model.size} x{cfg.model.n_layers}, policy {cfg.policy.name}, "
        f"seq_len {cfg.workload.seq_len}, batch {cfg.workload.batch_size} on {row['device']}",
    )
    try:
        _measure(cfg, device, row, progress, real_data)
    except Exception as e:  # noqa: BLE001 - every failure becomes a row; OOM is a result, not a crash
        if is_oom(e):
            row.update(status="oom", error=f"{e.__class__.__name__}: {str(e).splitlines()[0][:500]}")
        else:
            row.update(status="error", error=f"{e.__class__.__name__}: {e}"[:2000])
            log(progress, traceback.format_exc())
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    row["duration_s"] = time.perf_counter() - t0
    return row
