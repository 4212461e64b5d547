"""The search of `txlab advise`: estimate the candidates that can be the answer, rank those that fit.

Estimates are real training steps on fake tensors (`txlab.trial.estimate_trial`) priced by the time model, and
cost seconds each on a large model, so not every candidate is estimated. Within one layout the search walks a
staircase over (policy, micro-steps), on two stated assumptions (printed with every answer): the predicted peak
does not rise, and the predicted step time does not fall, with more micro-steps or with more recomputation
along sdpa < selective < checkpoint < recompute (selective's other save lists, `policy.selective_save`, sit
between selective and checkpoint: they save a subset of txlab's list and more than a block's input, a partial
order, txlab.advise.space.recomputes_no_more). Then only the fitting candidates that no other fitting
candidate dominates (less recomputation and no more micro-steps) can be the fastest, and only they and the
probes that find them are estimated:
  1. the fastest corner (sdpa, 1 micro-step): if it fits it dominates its whole layout;
  2. the leanest corner (recompute, most micro-steps): if it does not fit, nothing in the layout does;
  3. for each policy along the chain, the fewest micro-steps that fit, by bisection below the previous
     policy's (which bounds it); then for each other save list, by bisection between selective's and
     checkpoint's;
  4. not resharding after forward (more memory, fewer all-gathers) from each fitting point that step 1 or 3 found:
     the fewest micro-steps from there that fit for the same policy (an assumption too: no-reshard's own
     staircase is not walked, so a policy that only not resharding makes the fastest is not found);
  5. `planned` (the planner's own choice for the budget) at 1 micro-step, where the fastest corner did not fit.
A bound cuts steps 2-4: a candidate dominated by an estimate (fitting or not) whose predicted step time (or $/Mtok)
is already no better than the best that fits so far, in any layout, cannot win under the same assumptions, and is
not estimated (a layout whose fastest corner is slower than the best found is done after one estimate).
Every layout is walked; layouts are independent, so their estimates run at once (an executor: a process pool
in the command, the caller's thread in tests), best first so that the bound exists before the expensive probes:
every layout's fastest corner, then the layouts in the order of their fastest corners' times. An estimate with
the same trial key as one already made (a `--store` from an earlier run) is reused, not run again.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from txlab.advise.space import CHAIN, Candidate, Layout, Space, raw_config, recomputes_no_more
from txlab.config import ConfigError, build_config

ASSUMPTIONS = (
    "within a layout, the predicted peak is assumed not to rise and the predicted step time not to fall with "
    "more micro-steps or more recomputation (sdpa < selective < selective's other save lists < checkpoint < "
    "recompute); a candidate that a fitting one dominates is not estimated; not resharding after forward is tried "
    "only from the fitting points resharding's search found (the same policy, the fewest micro-steps from there "
    "that fit); a candidate dominated by an estimate already no better than the best that fits is not estimated"
)


TIME = "predicted_step_time_s"


def estimate_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """One candidate's estimate row (runs in a worker process: imports torch there)."""
    from txlab.trial import estimate_trial

    return estimate_trial(build_config(raw))


@dataclass
class Estimate:
    cand: Candidate
    row: dict[str, Any]
    reused: bool = False

    @property
    def fits(self) -> bool:
        return self.row.get("status") == "ok"

    @property
    def peak(self) -> int | None:
        return self.row.get("peak_bytes")


Walk = Generator[Candidate, Estimate, None]


def walk(cands: list[Candidate], best: Callable[[], float | None] = lambda: None, col: str = TIME) -> Walk:
    """The staircase over one layout's candidates (module docstring): yields the next candidate to estimate and
    receives its Estimate. `best()`: the best `col` among the fitting estimates so far (all layouts), the bound."""
    cell = {(c.layout.reshard, c.scheme, c.grad_accum): c for c in cands}
    schemes = {k[1] for k in cell}
    chain = [p for p in CHAIN if p in schemes]
    variants = sorted(p for p in schemes if p not in CHAIN and p != "planned")  # selective's other save lists
    gas = sorted({k[2] for k in cell})
    known: dict[tuple[bool, str, int], bool | None] = {}  # None: cannot beat the best (not estimated)
    times: dict[tuple[bool, str, int], float] = {}

    def beaten(key: tuple[bool, str, int]) -> bool:
        """An estimate that dominates `key` (same resharding, no more recomputation, no more micro-steps) is
        already no better than the best that fits: under the assumptions, neither is `key`."""
        b = best()
        if b is None:
            return False
        return any(
            t >= b and r == key[0] and recomputes_no_more(q, key[1]) and g <= key[2] for (r, q, g), t in times.items()
        )

    def fits(p: str, gi: int, reshard: bool = True):
        key = (reshard, p, gas[gi])
        if key not in cell:
            return False
        if key not in known:
            if beaten(key):
                known[key] = None
            else:
                est = yield cell[key]
                known[key] = est.fits
                if est.row.get(col) is not None:
                    times[key] = est.row[col]
        return known[key]

    frontier: list[tuple[str, int]] = []  # fitting (scheme, micro-steps index) that no other fitting one dominates

    def fewest(p: str, lo: int, bound: int, reshard: bool = True):
        """The fewest micro-steps (index) in [lo, bound) at which `p` fits or cannot win, by bisection; `bound`:
        none below it does. A fitting answer (resharding) joins the frontier."""
        hi = bound
        while lo < hi:
            mid = (lo + hi) // 2
            if (yield from fits(p, mid, reshard)) is not False:  # fits, or cannot win: look below it
                hi = mid
            else:
                lo = mid + 1
        if reshard and hi < bound and known.get((True, p, gas[hi])) is True:
            frontier.append((p, hi))
        return hi

    if chain:
        if (yield from fits(chain[0], 0)):
            frontier.append((chain[0], 0))
        elif (yield from fits(chain[-1], len(gas) - 1)):
            bound = len(gas)  # the fewest micro-steps (index) that fit under the policies walked so far
            below: dict[str, int] = {}
            for p in chain:
                below[p] = bound = yield from fewest(p, 0, bound)
            # a save list between selective and checkpoint fits from no fewer micro-steps than the next leaner
            # policy and is dominated from selective's fewest on
            upper = min([below[p] for p in chain if recomputes_no_more(p, "selective")], default=len(gas))
            lower = max([below[p] for p in chain if recomputes_no_more("checkpoint", p)], default=0)
            for v in variants:
                yield from fewest(v, lower, upper)
    # not resharding: more memory (so it fits from no fewer micro-steps), less communication; per frontier point,
    # the fewest micro-steps from there that fit without resharding
    for p, gi in list(frontier):  # the frontier point itself first: the likeliest answer, and the bound above it
        if (yield from fits(p, gi, reshard=False)) is False:
            yield from fewest(p, gi + 1, len(gas), reshard=False)
    corner_fits = bool(chain) and known.get((True, chain[0], gas[0])) is True
    if (True, "planned", 1) in cell and not corner_fits:  # gas[0] is 1: one micro-step always divides the batch
        yield from fits("planned", 0)


def leanest(cands: list[Candidate]) -> Walk:
    """Only the leanest corner of a layout (resharding, the most recomputation, the most micro-steps): under the
    search's assumptions, whether anything in the layout fits (the question of the fewest devices that fit)."""
    chain = [c for c in cands if c.layout.reshard and c.scheme in CHAIN]
    if chain:
        yield max(chain, key=lambda c: (CHAIN.index(c.scheme), c.grad_accum))


@dataclass
class Result:
    space: Space
    estimates: list[Estimate] = field(default_factory=list)
    wall_s: float = 0.0

    def by_layout(self, layout: Layout) -> list[Estimate]:
        return [e for e in self.estimates if e.cand.layout == layout]

    @property
    def reused(self) -> int:
        return sum(e.reused for e in self.estimates)


class InProcess(cf.Executor):
    """An executor that runs each call at submit, in the caller's thread (tests; one worker)."""

    def submit(self, fn, /, *args, **kwargs):
        f: cf.Future = cf.Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever reads the future, as a pool would
            f.set_exception(e)
        return f


def search(
    space: Space,
    executor: cf.Executor,
    known: dict[str, dict[str, Any]] | None = None,
    on_estimate: Callable[[Result, Estimate], None] | None = None,
    estimate: Callable[[dict[str, Any]], dict[str, Any]] = estimate_raw,
    objective: str = "time",
    lean: bool = False,
    slots: int = 1,
) -> Result:
    """Walk every layout of `space`, estimating on `executor` (`slots`: its workers, the estimates kept in flight);
    `known`: trial key -> a stored estimate row to reuse; `lean`: only each layout's leanest corner (does anything
    fit?), not the staircase, and no more once one fits. A ConfigError raised by an estimate (bad input found
    late, e.g. a checkpoint) propagates; any other failure of one estimate is that candidate's `error` row.

    Best first: a free slot goes to a layout not yet estimated (its first estimate, the fastest corner, is cheap
    and bounds the whole layout), then to the layout whose fastest corner is best. A walk is advanced only when its
    layout gets a slot, so it decides its next candidate against the best found by then: the layouts that cannot
    win are cut after one estimate instead of queueing their expensive leanest corners before any bound exists."""
    t0 = time.monotonic()
    result = Result(space)
    known = dict(known or {})
    col = objective_key(objective)

    def best() -> float | None:
        vals = [e.row[col] for e in result.estimates if e.fits and e.row.get(col) is not None]
        return min(vals) if vals else None

    walks = {layout: leanest(cands) if lean else walk(cands, best, col) for layout, cands in space.families.items()}
    order = {layout: i for i, layout in enumerate(walks)}
    first: dict[Layout, float] = {}  # a layout's first estimate's `col` (its fastest corner): its bound
    reply: dict[Layout, Estimate] = {}  # what a started walk is sent when its layout next gets a slot
    idle = list(walks)  # layouts waiting for a slot (not in flight, not finished)
    pending: dict[cf.Future, tuple[Layout, Candidate]] = {}

    def priority(layout: Layout) -> tuple[int, float, int]:
        if layout not in reply:
            return (0, 0.0, order[layout])
        return (1, first.get(layout, float("inf")), order[layout])

    def advance(layout: Layout) -> None:
        est = reply.get(layout)
        while True:
            try:
                cand = walks[layout].send(est) if est is not None else next(walks[layout])
            except StopIteration:
                return
            raw = raw_config(space.base, cand)
            key = build_config(raw).trial_key
            if key in known:  # reused: answer at once and walk on
                est = Estimate(cand, known[key], reused=True)
                record(layout, est)
                continue
            pending[executor.submit(estimate, raw)] = (layout, cand)
            return

    def record(layout: Layout, est: Estimate) -> None:
        if layout not in reply and est.row.get(col) is not None:
            first[layout] = est.row[col]
        reply[layout] = est
        result.estimates.append(est)
        if on_estimate is not None:
            on_estimate(result, est)

    def answered() -> bool:  # a lean count's question (does anything fit?) is answered
        return lean and any(e.fits for e in result.estimates)

    def launch() -> None:
        while idle and len(pending) < max(1, slots) and not answered():
            layout = min(idle, key=priority)
            idle.remove(layout)
            advance(layout)

    launch()
    while pending:
        done, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
        for fut in done:
            layout, cand = pending.pop(fut)
            try:
                row = fut.result()
            except ConfigError:
                for other in pending:
                    other.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - one candidate's failure (or its worker's death) is its row
                row = {"status": "error", "error": f"{e.__class__.__name__}: {e}"}
            est = Estimate(cand, row)
            known[row.get("trial_key", "")] = row
            record(layout, est)
            idle.append(layout)
        launch()
    result.wall_s = time.monotonic() - t0
    return result


def objective_key(objective: str) -> str:
    return "predicted_usd_per_mtok" if objective == "cost" else TIME


def ranked(result: Result, objective: str) -> tuple[list[Estimate], list[Estimate]]:
    """(the fitting estimates best first, priced before unpriced; the rest, leanest first)."""
    col = objective_key(objective)
    fit = [e for e in result.estimates if e.fits]
    fit.sort(key=lambda e: (e.row.get(col) is None, e.row.get(col) or 0.0, e.peak or 0))
    rest = [e for e in result.estimates if not e.fits]
    rest.sort(key=lambda e: (e.peak is None, e.peak or 0))
    return fit, rest
