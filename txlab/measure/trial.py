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
import time
from typing import Any

import torch

from txlab.config import TrialConfig
from txlab.measure.budget import budget_bytes
from txlab.measure.device import device_info, resolve_device
from txlab.measure.inference import measure_inference
from txlab.measure.progress import log
from txlab.measure.row import base_row, failure_row
from txlab.measure.sharded import run_sharded
from txlab.measure.step import trial_batches
from txlab.measure.training import check_inputs, measure_training


def _measure(cfg: TrialConfig, device: torch.device, row: dict[str, Any], progress: bool, real_data=None) -> None:
    budget = budget_bytes(cfg.measure.budget_gib)
    if device.type == "cuda" and budget is not None:
        # A real cap: allocations past the budget raise OutOfMemoryError, as on a smaller device.
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / row["device_capacity_bytes"]), device)
    data = trial_batches(cfg, device, real_data)
    if cfg.workload.kind in ("prefill", "decode"):  # no-grad forward (+ decode steps) under a KV policy
        measure_inference(cfg, device, row, progress, data)
    else:
        measure_training(cfg, device, row, progress, data)


def run_trial(cfg: TrialConfig, progress: bool = False) -> dict[str, Any]:
    """Run one trial and return its flat result row (see docs/design.md and txlab.results.columns).
    `parallel.fsdp` > 1: N ranks on this machine (txlab.measure.sharded), one row."""
    if cfg.parallel.fsdp > 1:
        return run_sharded(cfg, progress)
    t0 = time.perf_counter()
    row = base_row(cfg)
    device = resolve_device(cfg.measure.device)
    row["device"], row["device_capacity_bytes"] = device_info(device)
    real_data = check_inputs(cfg)
    log(
        progress,
        f"trial {row['trial_key']}: {cfg.model.size} x{cfg.model.n_layers}, policy {cfg.policy.name}, "
        f"seq_len {cfg.workload.seq_len}, batch {cfg.workload.batch_size} on {row['device']}",
    )
    try:
        _measure(cfg, device, row, progress, real_data)
    except Exception as e:  # noqa: BLE001 - every failure becomes a row; OOM is a result, not a crash
        failure_row(row, e, progress)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    row["duration_s"] = time.perf_counter() - t0
    return row
