"""The measured training trial's steps, on one device or as one rank of a sharded trial: two steps under
the memory monitor (the first creates AdamW's state, the second is a steady-state step; the peak is
over both), then `warmup_steps` untimed steps, then `steps` timed steps (device synchronized around each;
the median is reported). `txlab.measure.trial` runs it on one device, `txlab.measure.sharded` on each rank.

A `workload.compile` trial compiles in an untimed step before the memory steps, and that step is its first
warm-up step: so a compiled trial trains the same steps on the same batches as the eager one and their
losses compare (with `warmup_steps: 0` the compiling step is still taken: one step more than eager).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from txlab.config import TrialConfig
from txlab.data.loader import bits_per_byte, open_data
from txlab.measure.budget import BudgetExceeded, budget_bytes, infeasible_plan_row, over_budget, stopped_row
from txlab.measure.device import sync
from txlab.measure.formula import formula_activation_bytes, plan_segments
from txlab.measure.memory import MemoryMonitor, RssWindow
from txlab.measure.planning import plan_trial
from txlab.measure.progress import log
from txlab.measure.step import MEMORY_STEPS, TrialParts, build_trial, compile_step
from txlab.measure.throughput import flops_per_token, mfu
from txlab.model.decode import context_length
from txlab.model.hf import check_pretrained
from txlab.parallel.fsdp import Ranks, mean_over_ranks
from txlab.policy.planner import NoFeasiblePlan


def _plan(cfg: TrialConfig, device: torch.device, row: dict[str, Any], progress: bool) -> list | None:
    """The planner's runs for a `planned` trial (None for the other policies). Raises NoFeasiblePlan."""
    if cfg.policy.remat != "planned":
        return None
    chosen = plan_trial(cfg, device.type)
    row["plan"] = chosen.describe()
    log(progress, f"  plan: {row['plan']}")
    return chosen.runs


def _memory_steps(
    parts: TrialParts, device: torch.device, budget: int | None, row: dict[str, Any], progress: bool, sharded: bool
):
    """The two monitored steps (AdamW's state is created in the first): the peak and its breakdown."""
    batches = [parts.data.next() for _ in range(MEMORY_STEPS)]
    inputs = [t for b in batches for t in b]
    try:
        with MemoryMonitor(device, parts.model, parts.optimizer, inputs, budget, sharded=sharded) as monitor:
            for i, (x, y) in enumerate(batches):
                loss = parts.step(x, y)
                monitor.end_step()
                log(progress, f"  memory step {i + 1}/{MEMORY_STEPS}  loss {loss.item():.4f}")
    finally:
        del batches, inputs
    row.update(monitor.stats().as_row())


def _timed_steps(
    parts: TrialParts, cfg: TrialConfig, device: torch.device, progress: bool, warmup: int
) -> tuple[list[float], float]:
    """`warmup` untimed steps, then `steps` timed ones (device synchronized): their times, last loss."""
    w = cfg.workload
    for i in range(warmup):
        parts.step(*parts.data.next())
        log(progress, f"  warm-up step {i + 1}/{warmup}")
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


def measure_training(
    cfg: TrialConfig, device: torch.device, row: dict[str, Any], progress: bool, data, ranks: Ranks | None = None
) -> None:
    """Fill `row` with the figures of the training steps (one rank's figures when `ranks` is given: its
    memory, its step time; the loss is the global batch's, averaged over the ranks)."""
    m, w = cfg.model, cfg.workload
    budget = budget_bytes(cfg.measure.budget_gib)
    try:
        plan = _plan(cfg, device, row, progress)
    except NoFeasiblePlan as e:
        infeasible_plan_row(row, e)
        return
    parts = build_trial(cfg, device, plan=plan, data=data, ranks=ranks)
    row["n_params"] = parts.model.num_params()
    row["flops_per_token"] = flops_per_token(
        parts.model.num_non_embedding_params(), m.n_layers, m.n_heads, m.attn_head_dim(), w.seq_len
    )
    row["formula_activation_bytes"] = formula_activation_bytes(cfg, plan_segments(plan))
    with RssWindow() as rss:
        # compiled: the compiling step first, so compilation is timed apart and stays out of the memory window
        first_s = compile_step(parts.step, parts.data, device) if w.compile else None
        try:
            _memory_steps(parts, device, budget, row, progress, sharded=ranks is not None)
        except BudgetExceeded as e:
            stopped_row(row, e)
            return
        warmup = max(0, w.warmup_steps - 1) if w.compile else w.warmup_steps  # the compiling step was the first
        times, row["loss"] = _timed_steps(parts, cfg, device, progress, warmup)
    if ranks is not None:
        row["loss"] = mean_over_ranks(row["loss"], device)
    row["peak_rss_bytes"] = rss.peak if device.type == "cpu" else None
    row["step_time_s"] = statistics.median(times)
    if first_s is not None:
        row["compile_s"] = max(0.0, first_s - row["step_time_s"])
        log(progress, f"  compiled in {row['compile_s']:.1f} s (first step {first_s:.1f} s)")
    row["tokens_per_s"] = w.batch_size * w.seq_len / row["step_time_s"]  # the global batch
    if device.type == "cuda":
        row["mfu"] = mfu(row["flops_per_token"], row["tokens_per_s"], row["device"], w.dtype)
    if parts.data.last_bytes is not None:  # real text: the same batch's loss over the bytes its targets cover
        row["bits_per_byte"] = bits_per_byte(row["loss"], w.batch_size * w.seq_len, parts.data.last_bytes)
    if not math.isfinite(row["loss"]):
        row.update(status="error", error=f"loss is {row['loss']}: training diverged")
        return
    if not over_budget(row, budget):
        row["status"] = "ok"


def check_inputs(cfg: TrialConfig):
    """Bad data or weights are a ConfigError here, before any work; returns the opened data (or None)."""
    real_data = open_data(cfg) if cfg.data.source != "synthetic" else None
    if cfg.model.init == "pretrained":
        check_pretrained(cfg.model, context_length(cfg))
    return real_data
