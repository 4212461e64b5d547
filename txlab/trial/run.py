"""One trial as one pipeline: resolve the config once (`txlab.trial.resolve`), run one stage that fills
typed records (measured training, measured inference, the sharded ranks, or the estimate on fake
tensors), decide how it ended (`txlab.trial.pipeline`), and build the row in one place (`txlab.trial.row`).

`run_trial(cfg) -> row` never raises for out-of-memory or over-budget: those are statuses. Other failures
during the run become an `error` row with the message. Config errors are raised before any work (the
config is validated when it is built, the data and weights when it is resolved).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import torch

from txlab.config import ConfigError, TrialConfig
from txlab.measure.records import Facts, from_row
from txlab.runtime.device import device_info, device_kind, free_bytes, kind_info
from txlab.runtime.progress import log
from txlab.trial.estimate import estimate_training
from txlab.trial.infer import measure_inference
from txlab.trial.pipeline import Limit, pipeline
from txlab.trial.predict import predict_measured, prediction_columns, with_prediction
from txlab.trial.resolve import Setup, resolve
from txlab.trial.row import Where
from txlab.trial.sharded import check_ranks, run_sharded
from txlab.trial.train import measure_training


@contextlib.contextmanager
def device_window(setup: Setup, capacity_bytes: int | None) -> Iterator[None]:
    """A measured trial's device: on CUDA the budget is a real cap (allocations past it raise
    OutOfMemoryError, as on a smaller device); memory is released after the trial."""
    device = setup.device
    if device.type == "cuda" and setup.budget_bytes is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, setup.budget_bytes / capacity_bytes), device)
    try:
        yield
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, device)


def run_trial(cfg: TrialConfig, progress: bool = False) -> dict[str, Any]:
    """Run one trial in this process (N local ranks for a sharded layout) and return its result row
    (docs/design.md, "Result row")."""
    setup = resolve(cfg)
    if setup.sharded:
        check_ranks(setup)  # bad input (more ranks than this machine starts) before any work or output
        where = Where(*device_info(setup.device if setup.device.type == "cpu" else torch.device("cuda", 0)))
        log(progress, f"trial {setup.trial_key}: {cfg.model.size} x{cfg.model.n_layers}, policy {cfg.policy.name}, "
                      f"{setup.layout.describe()} ({setup.device.type}), "
                      f"global batch {cfg.workload.batch_size}")  # fmt: skip
        row = run_sharded(cfg, setup, where, progress)
        if setup.hardware is not None and row["status"] == "ok":  # the time model's columns, beside the measured
            row.update(prediction_columns(predict_measured(setup, from_row(Facts, row))))
        return row
    where = Where(*device_info(setup.device))
    w = cfg.workload
    log(progress, f"trial {setup.trial_key}: {cfg.model.size} x{cfg.model.n_layers}, policy {cfg.policy.name}, "
                  f"seq_len {w.seq_len}, batch {w.batch_size} on {where.device}")  # fmt: skip
    stage = measure_inference if w.kind in ("prefill", "decode") else with_prediction(measure_training)
    with device_window(setup, where.device_capacity_bytes):
        return pipeline(cfg, setup, where, stage, progress=progress)


DEVICE_KINDS = ("cpu", "cuda")


def refuse_inference(cfg: TrialConfig) -> None:
    """The estimator models training steps only: a prefill / decode trial is bad input here."""
    if cfg.workload.kind != "train":
        raise ConfigError(
            f"workload.kind: txlab estimate predicts training steps only, got {cfg.workload.kind!r}; "
            "allowed: train (measure prefill/decode with txlab run)"
        )


def estimate_trial(
    cfg: TrialConfig,
    device_kind: str | None = None,
    capacity_bytes: int | None = None,
    progress: bool = False,
    limit: Limit | None = None,
    not_run: bool = False,
) -> dict[str, Any]:
    """The row `run_trial(cfg)` would produce, predicted on fake tensors: `measured = False`, memory
    figures filled, time figures empty. Status `ok`, or `over_budget` when the predicted peak is over
    `measure.budget_gib`, over `capacity_bytes` (when given; also the row's device capacity) or over
    `limit`; never raises for a failing trial (`error` row), only for bad input (ConfigError).
    `not_run`: the estimate decides that the trial is not run (a precheck); its verdict says so."""
    refuse_inference(cfg)
    if device_kind is not None and device_kind not in DEVICE_KINDS:
        raise ConfigError(f"device kind {device_kind!r}: allowed: {', '.join(DEVICE_KINDS)}")
    setup = resolve(cfg, estimate=True, kind=device_kind)
    device, default_capacity = kind_info(setup.kind)
    if setup.hardware is not None and setup.hardware.kind == setup.kind:  # the profile's device: its memory a limit
        device, default_capacity = setup.hardware.device_name, setup.hardware.memory_bytes
        capacity_bytes = capacity_bytes if capacity_bytes is not None else default_capacity
    where = Where(device, capacity_bytes if capacity_bytes is not None else default_capacity, threads=None)
    capacity = Limit(capacity_bytes, "the capacity of") if capacity_bytes is not None else None
    limits = (capacity, limit)
    return pipeline(cfg, setup, where, estimate_training, limits, predicted=True, progress=progress, not_run=not_run)


def precheck(cfg: TrialConfig, ranks_here: int = 1) -> dict[str, Any] | None:
    """The estimate's row when the trial is predicted over its budget or over the memory free now (on
    CPU an allocation past RAM may end the process instead of raising), else None: run it.

    `ranks_here`: ranks of a sharded trial running on this machine's CPU, which share its RAM: each is
    held to its share (one rank of the trial is estimated, on the fake process group of N). A `planned`
    trial is not prechecked here: its planner already checks its plan with the estimator."""
    if cfg.policy.remat == "planned" or cfg.workload.kind != "train":  # inference: not modelled, run it
        return None
    kind = device_kind(cfg.measure.device)
    free = free_bytes(kind, cfg.measure.device)
    if free is None:
        limit = None
    elif ranks_here > 1 and kind == "cpu":
        share = f"its share of the RAM free now (1/{ranks_here}: {ranks_here} ranks on this machine),"
        limit = Limit(free // ranks_here, share)
    else:
        limit = Limit(free, "the memory free now,")
    row = estimate_trial(cfg, kind, limit=limit, not_run=True)
    return row if row["status"] == "over_budget" else None
