"""How a trial ends, decided in one place: the over-budget verdict (measured trials, inference trials and
estimates alike, so their statuses and messages agree), and the outcome of an exception (out of memory is
status `oom`, the tracker stopping at the budget and the planner finding no plan are `over_budget`,
anything else `error`)."""

from __future__ import annotations

import dataclasses
import math
import traceback
from dataclasses import dataclass

from txlab.measure.memory import BudgetExceeded
from txlab.measure.records import Facts, Memory, Outcome, Records
from txlab.policy.planner import NoFeasiblePlan
from txlab.runtime.device import is_oom
from txlab.runtime.progress import log
from txlab.text import first_line
from txlab.units import GiB


@dataclass(frozen=True)
class Limit:
    """Memory a trial's peak must stay under, and how a message names it ("the budget of", "the capacity
    of", "the memory free now,", ...): "peak 1.500 GiB over the budget of 1.000 GiB"."""

    bytes: int
    name: str = "the budget of"


def budget(budget_bytes: int | None) -> Limit | None:
    return None if budget_bytes is None else Limit(budget_bytes)


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
