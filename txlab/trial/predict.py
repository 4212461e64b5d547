"""The time model in the trial pipeline: the operator trace of the trial's real step, recorded on fake tensors
in the estimator's own run (txlab.trial.fake, so every layout the estimator builds is traced as it builds it),
priced on the hardware profile resolved with the trial (`Setup.hardware`, txlab.timemodel).

An estimate records the trace in the run that predicts its memory. A measured trial whose row gets a
prediction (`measure.hardware`, or this machine's `local` profile: txlab.trial.resolve) runs the fake step once
more after its measurement, for the device kind of the profile (a GPU profile's step uses CUDA's fused AdamW,
as `txlab estimate` does).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from txlab.measure.records import Facts, Memory, Prediction, Records, Traffic
from txlab.timemodel.predict import Work, predict
from txlab.timemodel.trace import Op, traffic
from txlab.trial.accumulate import accumulated_step_memory
from txlab.trial.resolve import Setup


def traced_step_memory(
    setup: Setup, plan: list[tuple[int, int, str]] | None = None
) -> tuple[Memory, torch.nn.Module, list[Op]]:
    """The fake step of the trial (its steady step) with that step's operators recorded: one run, or a deep model's
    extrapolated exactly from a few depths (txlab.trial.extrapolate), and a step of many micro-steps from a few of
    them (txlab.trial.accumulate)."""
    memory, model, ops = accumulated_step_memory(setup, plan, trace=True)
    assert ops is not None
    return memory, model, ops


def cpu_threads(setup: Setup) -> int | None:
    """The threads each rank of the trial computes with on a CPU (what a local profile's tables are read for):
    this process's for one rank, the cores shared by the ranks otherwise (as txlab.trial.sharded sets them)."""
    if setup.hardware is None or setup.hardware.kind != "cpu":
        return None
    world = setup.layout.world
    return torch.get_num_threads() if world == 1 else max(1, (os.cpu_count() or 1) // world)


def work_of(setup: Setup, facts: Facts | None) -> Work:
    w = setup.workload
    return Work(
        tokens=w.batch_size * w.seq_len,
        devices=setup.layout.world,
        dtype=w.dtype,
        flops_per_token=facts.flops_per_token if facts is not None else None,
        threads=cpu_threads(setup),
    )


def predicted(setup: Setup, ops: list[Op], facts: Facts | None) -> Prediction:
    """The row's predicted figures from the trace `ops` of the trial's step."""
    assert setup.hardware is not None
    return predict(ops, setup.hardware, work_of(setup, facts), setup.usd_per_device_hour)


def traffic_of(setup: Setup, ops: list[Op]) -> Traffic:
    """The row's comm_*_bytes columns from the trace of the trial's step (rank 0's)."""
    return Traffic(**{f"comm_{kind}_bytes": n for kind, n in traffic(ops, setup.layout.cp_group(0)).items()})


def predict_measured(
    setup: Setup, facts: Facts | None, plan: list[tuple[int, int, str]] | None = None
) -> tuple[Prediction, Traffic]:
    """The prediction of a measured trial and its collectives' bytes: its step traced on fake tensors for the
    profile's device kind (the same collectives as the measured step: their shapes do not depend on the device)."""
    assert setup.hardware is not None
    traced = dataclasses.replace(setup, kind=setup.hardware.kind)
    _, _, ops = traced_step_memory(traced, plan)
    return predicted(setup, ops, facts), traffic_of(setup, ops)


def with_prediction(stage):
    """A measured training stage followed by the time model's prediction of the same step (when the trial has a
    profile and the stage ran to its end: a failed stage raises before)."""

    def run(setup: Setup, rec: Records, progress: bool = False) -> None:
        stage(setup, rec, progress)
        if setup.hardware is not None:
            rec.prediction, rec.traffic = predict_measured(setup, rec.facts, _plan_runs(setup, progress))

    return run


def _plan_runs(setup: Setup, progress: bool) -> list[tuple[int, int, str]] | None:
    if setup.policy.remat != "planned":
        return None
    from txlab.trial.plan import planned

    plan = planned(setup, progress)
    return plan.runs if plan is not None else None


def prediction_columns(predicted: tuple[Prediction, Traffic]) -> dict[str, Any]:
    """The prediction's and traffic's row columns (a sharded trial's row, built from its ranks' rows, takes them
    here)."""
    return {k: v for record in predicted for k, v in dataclasses.asdict(record).items()}
