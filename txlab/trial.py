"""One measured trial in the current process: build, apply the policy, train a few steps, measure.

`workload.kind` prefill / decode trials are measured by `txlab.inference.measure_inference` (same
monitor, same timing rules); this module dispatches to it.

`run_trial(cfg) -> row` never raises for out-of-memory or over-budget: those are statuses. Other
failures during the run become an `error` row with the message. Config errors are raised before
any work (the config is validated when it is built).

Order of steps: two steps under the memory monitor (the first creates the optimizer state, the
second is a steady-state step; the peak is taken over both), then `warmup_steps` untimed steps, then
`steps` timed steps (device synchronized around each; the median is reported).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import math
import socket
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from txlab import __version__
from txlab.columns import FIGURES
from txlab.config import TrialConfig
from txlab.memory import GiB, BudgetExceeded, MemoryMonitor, RssWindow
from txlab.model import GPT
from txlab.policy import apply_policy
from txlab.remat import apply_plan
from txlab.throughput import flops_per_token, mfu

MEMORY_STEPS = 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from txlab.config import ConfigError

        raise ConfigError(f"measure.device: {name!r} asked for but no CUDA device is available; allowed here: auto, cpu")
    return dev


def device_info(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.name, int(props.total_memory)
    import psutil

    return "cpu", int(psutil.virtual_memory().total)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc)
    # CPU allocation failures surface as RuntimeError from the default allocator.
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "can't allocate memory" in msg or "out of memory" in msg.lower() or isinstance(exc, MemoryError)
    )


class SyntheticBatches:
    """Uniform random tokens, seeded; inputs and next-token targets of shape (B, T)."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int, device: torch.device):
        self.gen = torch.Generator().manual_seed(seed)
        self.shape = (batch_size, seq_len + 1)
        self.vocab_size, self.device = vocab_size, device

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, self.vocab_size, self.shape, generator=self.gen).to(self.device)
        return tokens[:, :-1], tokens[:, 1:]


def make_optimizer(model: torch.nn.Module, device: torch.device, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW; fused (one kernel, no per-parameter temporaries) on CUDA unless `fused` says otherwise."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95),
                             fused=device.type == "cuda" if fused is None else fused)


def make_step(model, loss_fn, optimizer, device: torch.device, dtype: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    )

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            hidden = model(x)
            loss = loss_fn(hidden, model.lm_head.weight, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def base_row(cfg: TrialConfig) -> dict[str, Any]:
    row: dict[str, Any] = {
        "trial_key": cfg.trial_key,
        "sweep": None,
        "status": "error",
        "error": None,
        "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": None,
        "host": socket.gethostname(),
        "node_id": None,
        "device": None,
        "device_capacity_bytes": None,
        "torch_version": torch.__version__,
        "txlab_version": __version__,
        "measured": True,
    }
    row.update(cfg.flat())
    row.update(dict.fromkeys(FIGURES))
    return row


@dataclass
class TrialParts:
    """What one trial trains: built once, shared by the measured run and the estimator."""

    model: GPT
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    data: SyntheticBatches


def build_trial(cfg: TrialConfig, device: torch.device, fused_optimizer: bool | None = None,
                plan: list[tuple[int, int, str]] | None = None, data=None) -> TrialParts:
    """Model on `device` with the policy applied, AdamW, the step function and the data.

    Works under a FakeTensorMode too (the estimator): the model is built on the CPU and moved only
    when `device` is not the CPU. `fused_optimizer` lets the estimator build CUDA's fused AdamW on
    fake CPU tensors (None: fused on CUDA only). `plan`: the runs chosen by txlab.planner, required
    with policy.remat = planned. `data`: the batches to train on (default: synthetic tokens).
    """
    m, w = cfg.model, cfg.workload
    torch.manual_seed(cfg.seed)
    model = GPT(m, w.seq_len)
    if device.type != "cpu":  # a no-op on the CPU, and one fake tensors cannot take (Module._apply swaps)
        model = model.to(device)
    if cfg.policy.remat == "planned":
        if plan is None:
            raise ValueError("policy.remat = planned needs a plan (txlab.planner.plan_trial)")
        loss_fn = apply_policy(model, dataclasses.replace(cfg.policy, remat="none"))
        apply_plan(model, plan)
    else:
        loss_fn = apply_policy(model, cfg.policy)
    if w.compile:
        model.compile()
    optimizer = make_optimizer(model, device, fused_optimizer)
    if data is None:
        data = SyntheticBatches(m.vocab_size, w.batch_size, w.seq_len, cfg.seed, device)
    return TrialParts(model, loss_fn, optimizer, make_step(model, loss_fn, optimizer, device, w.dtype), data)


def _measure(cfg: TrialConfig, device: torch.device, row: dict[str, Any], progress: bool, real_data=None) -> None:
    m, w = cfg.model, cfg.workload
    budget = None if cfg.measure.budget_gib is None else int(cfg.measure.budget_gib * GiB)
    if device.type == "cuda" and budget is not None:
        # A real cap: allocations past the budget raise OutOfMemoryError, as on a smaller device.
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / row["device_capacity_bytes"]), device)
    data = None
    if real_data is not None:  # same shapes as the synthetic batches, real text (txlab.data)
        from txlab.data import TrialBatches

        data = TrialBatches(real_data, device)
    if w.kind in ("prefill", "decode"):  # no-grad forward (+ decode steps) under a KV policy: txlab.inference
        from txlab.inference import measure_inference

        if data is None:
            data = SyntheticBatches(m.vocab_size, w.batch_size, w.seq_len, cfg.seed, device)
        measure_inference(cfg, device, row, progress, data)
        return

    plan = None
    if cfg.policy.remat == "planned":
        from txlab.planner import NoFeasiblePlan, plan_trial

        try:
            chosen = plan_trial(cfg, device.type)
        except NoFeasiblePlan as e:
            row.update(status="over_budget", measured=False, error=str(e), peak_bytes=e.smallest_bytes, plan=e.plan.describe())
            return
        plan, row["plan"] = chosen.runs, chosen.describe()
        _log(progress, f"  plan: {row['plan']}")
    parts = build_trial(cfg, device, plan=plan, data=data)
    model, optimizer, step, data = parts.model, parts.optimizer, parts.step, parts.data
    row["n_params"] = model.num_params()
    row["flops_per_token"] = flops_per_token(model.num_non_embedding_params(), m.n_layers, m.n_heads, m.d_model // m.n_heads, w.seq_len)
    from txlab.estimate import formula_activation_bytes, plan_segments  # lazily: txlab.estimate imports this module

    row["formula_activation_bytes"] = formula_activation_bytes(cfg, plan_segments(plan))

    batches = [data.next() for _ in range(MEMORY_STEPS)]
    inputs = [t for b in batches for t in b]
    with RssWindow() as rss:
        try:
            with MemoryMonitor(device, model, optimizer, inputs, budget) as monitor:
                for i, (x, y) in enumerate(batches):
                    loss = step(x, y)
                    monitor.end_step()
                    _log(progress, f"  memory step {i + 1}/{MEMORY_STEPS}  loss {loss.item():.4f}")
        except BudgetExceeded as e:
            row.update(status="over_budget", error=str(e), peak_bytes=e.tracked_bytes, tracked_peak_bytes=e.tracked_bytes)
            return
        finally:
            del batches, inputs
        row.update(monitor.stats().as_row())
        for i in range(w.warmup_steps):
            step(*data.next())
            _log(progress, f"  warm-up step {i + 1}/{w.warmup_steps}")
        times = []
        for i in range(w.steps):
            x, y = data.next()
            _sync(device)
            t0 = time.perf_counter()
            loss = step(x, y)
            _sync(device)
            times.append(time.perf_counter() - t0)
            _log(progress, f"  timed step {i + 1}/{w.steps}  {times[-1]:.3f} s  loss {loss.item():.4f}")
    row["peak_rss_bytes"] = rss.peak if device.type == "cpu" else None
    row["step_time_s"] = statistics.median(times)
    row["tokens_per_s"] = w.batch_size * w.seq_len / row["step_time_s"]
    row["mfu"] = mfu(row["flops_per_token"], row["tokens_per_s"], row["device"], w.dtype) if device.type == "cuda" else None
    row["loss"] = float(loss.item())
    if real_data is not None:  # the same batch's loss over the bytes its targets cover
        from txlab.data import bits_per_byte

        row["bits_per_byte"] = bits_per_byte(row["loss"], w.batch_size * w.seq_len, data.last_bytes)
    if not math.isfinite(row["loss"]):
        row.update(status="error", error=f"loss is {row['loss']}: training diverged")
        return
    if budget is not None and row["peak_bytes"] > budget:
        row.update(status="over_budget", error=f"peak {row['peak_bytes'] / GiB:.3f} GiB over the budget of {budget / GiB:.3f} GiB")
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
        from txlab.data import open_data

        real_data = open_data(cfg)  # bad data input is a ConfigError here, before any work
    _log(progress, f"trial {row['trial_key']}: {cfg.model.size} x{cfg.model.n_layers}, policy {cfg.policy.name}, "
                   f"seq_len {cfg.workload.seq_len}, batch {cfg.workload.batch_size} on {row['device']}")
    try:
        _measure(cfg, device, row, progress, real_data)
    except Exception as e:  # noqa: BLE001 - every failure becomes a row; OOM is a result, not a crash
        if is_oom(e):
            row.update(status="oom", error=f"{e.__class__.__name__}: {str(e).splitlines()[0][:500]}")
        else:
            row.update(status="error", error=f"{e.__class__.__name__}: {e}"[:2000])
            _log(progress, traceback.format_exc())
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    row["duration_s"] = time.perf_counter() - t0
    return row
