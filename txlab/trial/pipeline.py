"""The trial pipeline: a resolved trial (`txlab.trial.resolve.Setup`), one stage that fills its typed
records, the verdict, the row (`txlab.trial.row`). Measured training, measured inference, one rank of a
sharded trial and the estimate on fake tensors are this pipeline with another stage (`txlab.trial.run`
picks it).

How a trial ends is decided here, in one place: the over-budget verdict (measured trials, inference trials
and estimates alike, so their statuses and messages agree), and the outcome of an exception (out of memory
is status `oom`, the tracker stopping at the budget and the planner finding no plan are `over_budget`,
anything else `error`)."""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from txlab.config import TrialConfig
from txlab.measure.memory import BudgetExceeded
from txlab.measure.records import Facts, Memory, Outcome, Records
from txlab.policy.planner import NoFeasiblePlan
from txlab.runtime.device import is_oom
from txlab.runtime.progress import log
from txlab.text import first_line
from txlab.trial.resolve import Setup
from txlab.trial.row import Where, build_row
from txlab.units import GiB

Stage = Callable[[Setup, Records, bool], None]


def pipeline(
    cfg: TrialConfig,
    setup: Setup,
    where: Where,
    stage: Stage,
    limits: tuple[Limit | None, ...] = (),
    predicted: bool = False,
    progress: bool = False,
    not_run: bool = False,
) -> dict[str, Any]:
    """Run `stage` on the resolved trial, decide its outcome against its budget (`setup.budget_bytes`) and
    further `limits`, and build its row. Exceptions of the stage are outcomes. `predicted`: the stage
    estimates; `not_run`: a verdict over a limit says the trial will not be run."""
    t0 = time.perf_counter()
    rec = Records()
    try:
        stage(setup, rec, progress)
        budget = Limit(setup.budget_bytes) if setup.budget_bytes is not None else None
        rec.outcome = decide(rec, [budget, *limits], predicted, not_run)
    except Exception as e:  # noqa: BLE001 - every failure becomes a row; OOM is a result, not a crash
        fail(rec, e, progress)
        if predicted:
            rec.outcome = dataclasses.replace(rec.outcome, measured=False)
    return build_row(cfg, where, rec, time.perf_counter() - t0)


# --- how a trial ends -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """Memory a trial's peak must stay under, and how a message names it ("the budget of", "the capacity
    of", "the memory free now,", ...): "peak 1.500 GiB over the budget of 1.000 GiB"."""

    bytes: int
    name: str = "the budget of"


def decide(rec: Records, limits: list[Limit | None], predicted: bool = False, not_run: bool = False) -> Outcome:
    """The outcome of a trial whose stage ran to the end: error when its loss is not finite, over_budget
    when its peak is over the first limit it passes, else ok. `not_run`: an estimate deciding that the trial
    is not run (a precheck) says so in its message."""
    measured = not predicted
    loss = rec.quality.loss if rec.quality is not None else None
    if loss is not None and not math.isfinite(loss):
        return Outcome("error", f"loss is {loss}: training diverged", measured)
    peak = rec.memory.peak_bytes if rec.memory is not None else None
    for limit in limits:
        if limit is not None and peak is not None and peak > limit.bytes:
            what = "predicted peak" if predicted else "peak"
            message = f"{what} {peak / GiB:.3f} GiB over {limit.name} {limit.bytes / GiB:.3f} GiB"
            return Outcome("over_budget", message + (" (not run)" if not_run else ""), measured)
    return Outcome("ok", None, measured)


def fail(rec: Records, e: BaseException, progress: bool = False) -> None:
    """Record the exception that ended a stage: the outcome, and what it tells of the memory."""
    if isinstance(e, BudgetExceeded):  # the CPU tracker stopped the step at the budget: a lower bound
        rec.memory = Memory(peak_bytes=e.tracked_bytes, tracked_peak_bytes=e.tracked_bytes)
        rec.outcome = Outcome("over_budget", str(e))
    elif isinstance(e, NoFeasiblePlan):  # the estimator's figure for the least-memory plan: an estimate
        rec.memory = Memory(peak_bytes=e.smallest_bytes)
        rec.facts = dataclasses.replace(rec.facts or Facts(), plan=e.plan.describe())
        rec.outcome = Outcome("over_budget", str(e), measured=False)
    elif is_oom(e):
        rec.outcome = Outcome("oom", f"{e.__class__.__name__}: {first_line(e, 500)}")
    else:
        rec.outcome = Outcome("error", f"{e.__class__.__name__}: {e}"[:2000])
        log(progress, traceback.format_exc())
