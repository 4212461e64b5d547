"""One measured trial in the current process: build, apply the policy, train a few steps, measure.

`workload.kind` prefill / decode trials are measured by `txlab.inference.measure_inference` (same
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
from txlab.data.synthetic import SyntheticBatches
from txlab.measure.budget import BudgetExceeded, GiB
from txlab.measure.device import device_info, is_oom, resolve_device, sync
from txlab.measure.memory import MemoryMonitor, RssWindow
from txlab.measure.progress import log
from txlab.measure.row import base_row
from txlab.measure.step import MEMORY_STEPS, build_trial
from txlab.measure.throughput import flops_per_token, mfu


def _measure(cfg: TrialConfig, device: torch.device, row: dict[str, Any], progress: bool, real_data=None) -> None:
    m, w = cfg.model, cfg.workload
    budget = None if cfg.measure.budget_gib is None else int(cfg.measure.budget_gib * GiB)
    if device.type == "cuda" and budget is not None:
        # A real cap: allocations past the budget raise OutOfMemoryError, as on a smaller device.
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / row["device_capacity_bytes"]), device)
    data = None
    if real_data is not None:  # same shapes as the synthetic batches, real text (txlab.data)
        from txlab.data.loader import TrialBatches

        data = TrialBatches(real_data, device)
    if w.kind in ("prefill", "decode"):  # no-grad forward (+ decode steps) under a KV policy: txlab.inference
        from txlab.measure.inference import measure_inference

        if data is None:
            data = SyntheticBatches(m.vocab_size, w.batch_size, w.seq_len, cfg.seed, device)
        measure_inference(cfg, device, row, progress, data)
        return

    plan = None
    if cfg.policy.remat == "planned":
        from txlab.measure.planning import plan_trial
        from txlab.policy.planner import NoFeasiblePlan

        try:
            chosen = plan_trial(cfg, device.type)
        except NoFeasiblePlan as e:
            row.update(
                status="over_budget", measured=False, error=str(e), peak_bytes=e.smallest_bytes, plan=e.plan.describe()
            )
            return
        plan, row["plan"] = chosen.runs, chosen.describe()
        log(progress, f"  plan: {row['plan']}")
    parts = build_trial(cfg, device, plan=plan, data=data)
    model, optimizer, step, data = parts.model, parts.optimizer, parts.step, parts.data
    row["n_params"] = model.num_params()
    row["flops_per_token"] = flops_per_token(
        model.num_non_embedding_params(), m.n_layers, m.n_heads, m.d_model // m.n_heads, w.seq_len
    )
    from txlab.measure.formula import formula_activation_bytes, plan_segments

    row["formula_activation_bytes"] = formula_activation_bytes(cfg, plan_segments(plan))

    batches = [data.next() for _ in range(MEMORY_STEPS)]
    inputs = [t for b in batches for t in b]
    with RssWindow() as rss:
        try:
            with MemoryMonitor(device, model, optimizer, inputs, budget) as monitor:
                for i, (x, y) in enumerate(batches):
                    loss = step(x, y)
                    monitor.end_step()
                    log(progress, f"  memory step {i + 1}/{MEMORY_STEPS}  loss {loss.item():.4f}")
        except BudgetExceeded as e:
            row.update(
                status="over_budget", error=str(e), peak_bytes=e.tracked_bytes, tracked_peak_bytes=e.tracked_bytes
            )
            return
        finally:
            del batches, inputs
        row.update(monitor.stats().as_row())
        for i in range(w.warmup_steps):
            step(*data.next())
            log(progress, f"  warm-up step {i + 1}/{w.warmup_steps}")
        times = []
        for i in range(w.steps):
            x, y = data.next()
            sync(device)
            t0 = time.perf_counter()
            loss = step(x, y)
            sync(device)
            times.append(time.perf_counter() - t0)
            log(progress, f"  timed step {i + 1}/{w.steps}  {times[-1]:.3f} s  loss {loss.item():.4f}")
    row["peak_rss_bytes"] = rss.peak if device.type == "cpu" else None
    row["step_time_s"] = statistics.median(times)
    row["tokens_per_s"] = w.batch_size * w.seq_len / row["step_time_s"]
    row["mfu"] = (
        mfu(row["flops_per_token"], row["tokens_per_s"], row["device"], w.dtype) if device.type == "cuda" else None
    )
    row["loss"] = float(loss.item())
    if real_data is not None:  # the same batch's loss over the bytes its targets cover
        from txlab.data.loader import bits_per_byte

        row["bits_per_byte"] = bits_per_byte(row["loss"], w.batch_size * w.seq_len, data.last_bytes)
    if not math.isfinite(row["loss"]):
        row.update(status="error", error=f"loss is {row['loss']}: training diverged")
        return
    if budget is not None and row["peak_bytes"] > budget:
        row.update(
            status="over_budget",
            error=f"peak {row['peak_bytes'] / GiB:.3f} GiB over the budget of {budget / GiB:.3f} GiB",
        )
        return
    row["status"] = "ok"


def run_trial(cfg: TrialConfig, progress: bool = False) -> dict[str, Any]:
    """Run one trial and return its flat result row (see DESIGN.md and txlab.columns)."""
    t0 = time.perf_counter()
    row = base_row(cfg)
    device = resolve_device(cfg.measure.device)
    row["device"], row["device_capacity_bytes"] = device_info(device)
    real_data = None
    if cfg.data.source != "synthetic":
        from txlab.data.loader import open_data

        real_data = open_data(cfg)  # bad data input is a ConfigError here, before any work
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
