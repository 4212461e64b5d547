"""One rule for memory budgets: GiB to bytes, the over-budget verdict, and the rows of the two ways a
trial ends over its budget before it is measured (the planner finds no plan; the CPU tracker stops it).

Measured trials, inference trials and estimates all decide "over budget" here, so the statuses and
messages of the three agree.
"""

from __future__ import annotations

from typing import Any

GiB = 2**30  # bytes; every GiB in txlab is 2^30 bytes


def budget_bytes(budget_gib: float | None) -> int | None:
    """`measure.budget_gib` (or any GiB figure) in bytes; None stays None (no budget)."""
    return None if budget_gib is None else int(budget_gib * GiB)


class BudgetExceeded(RuntimeError):
    """Tracked memory went over `measure.budget_gib` on a device without a hard cap (CPU)."""

    def __init__(self, tracked_bytes: int, budget_bytes: int):
        self.tracked_bytes, self.budget_bytes = tracked_bytes, budget_bytes
        super().__init__(
            f"tracked memory reached {tracked_bytes / GiB:.3f} GiB, over the budget of {budget_bytes / GiB:.3f} GiB; "
            "stopped there (peak_bytes is a lower bound)"
        )


def over_budget(row: dict[str, Any], limit: int | None, what: str = "budget", predicted: bool = False) -> bool:
    """Mark `row` over budget when its peak is past `limit` bytes (the budget, or a capacity); True if so."""
    if limit is None or row["peak_bytes"] is None or row["peak_bytes"] <= limit:
        return False
    peak = "predicted peak" if predicted else "peak"
    row.update(
        status="over_budget", error=f"{peak} {row['peak_bytes'] / GiB:.3f} GiB over the {what} of {limit / GiB:.3f} GiB"
    )
    return True


def stopped_row(row: dict[str, Any], e: BudgetExceeded) -> None:
    """The row of a trial the tracker stopped at the budget: its peak is a lower bound."""
    row.update(status="over_budget", error=str(e), peak_bytes=e.tracked_bytes, tracked_peak_bytes=e.tracked_bytes)


def infeasible_plan_row(row: dict[str, Any], e) -> None:
    """The row of a `planned` trial for which no plan fits (`txlab.policy.planner.NoFeasiblePlan`): the
    peak is the estimator's figure for the least-memory plan, so the row is an estimate."""
    row.update(status="over_budget", measured=False, error=str(e), peak_bytes=e.smallest_bytes, plan=e.plan.describe())
