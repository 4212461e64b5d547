"""`--devices` as a range: which device count to train on, and the search over counts.

`--devices N` searches one count. `--devices A-B` tries A, 2A, 4A, ... up to B (device counts come in doublings:
nodes of 8, pods of 256), `--devices A,B,C` the counts listed. Over the counts, the question is one of three:
  - `--target-tokens-per-s R`: the fewest devices whose best candidate is predicted to reach R tokens/s (all
    devices together); with `--objective cost`, the cheapest of the counts that reach it;
  - `--objective cost` alone: the count with the cheapest best candidate ($/Mtok);
  - neither: the fewest devices on which anything fits.
A count whose training state alone overflows a device (txlab.advise.prune) is ruled out in arithmetic. The
fewest-that-fit question walks the counts up from the first the arithmetic allows, probing only each layout's
leanest corner (if that does not fit, nothing in the layout does: the search's own assumption), and searches
the answer's count in full; the target bisects the counts on one more stated assumption (the best predicted
tokens/s does not fall with more devices); the cost objective searches every count the arithmetic allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from txlab.advise.search import Estimate, Result, ranked
from txlab.config import ConfigError

COUNT_ASSUMPTION = "the best predicted tokens/s is assumed not to fall with more devices (the counts are bisected)"
FIT_ASSUMPTION = "a count is taken to fit nothing when no layout's leanest corner fits (recompute, most micro-steps)"


def parse_devices(text: str) -> tuple[int, ...]:
    """`N`, `A-B` (A doubled up to B) or `A,B,...`: the device counts, ascending. ConfigError on anything else."""
    allowed = "allowed: a count (64), a range doubled from its start (8-256: 8, 16, ..., 256) or a list (8,24,64)"
    s = str(text).strip()
    try:
        parts = [int(x) for x in s.split("-")] if "-" in s else sorted({int(x) for x in s.split(",")})
    except ValueError:
        raise ConfigError(f"--devices: {s!r} is not a device count; {allowed}") from None
    if "-" in s:
        if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
            raise ConfigError(f"--devices: range {s!r} must run from a count >= 1 up to one no smaller; {allowed}")
        counts = [parts[0]]
        while counts[-1] * 2 <= parts[1]:
            counts.append(counts[-1] * 2)
    else:
        counts = parts
    if counts[0] < 1:
        raise ConfigError(f"--devices: must be >= 1, got {counts[0]}; {allowed}")
    return tuple(counts)


@dataclass
class Count:
    """One device count's outcome."""

    devices: int
    result: Result | None = None  # None: ruled out before any estimate (arithmetic, or no valid layout)
    why_not: str | None = None  # why nothing fits on this count (None when something does): the one-line error
    note: str = ""  # the same, short, for the table of counts
    full: bool = False  # the whole staircase ran (its best is known), not only the leanest corners

    def best(self, objective: str) -> Estimate | None:
        if self.result is None:
            return None
        fit, _ = ranked(self.result, objective)
        return fit[0] if fit else None

    def tokens_per_s(self) -> float:
        b = self.best("time")
        return (b.row.get("predicted_tokens_per_s") or 0.0) if b is not None else 0.0


Probe = Callable[[int, bool], Count]  # (devices, lean) -> its outcome


@dataclass
class Choice:
    question: str  # what was asked, in words
    counts: dict[int, Count]  # every count looked at
    chosen: Count | None  # None: no count answers
    tried: tuple[int, ...]


def choose(counts: tuple[int, ...], probe: Probe, objective: str, target: float | None) -> Choice:
    """The count that answers the question (module docstring); `probe(n, lean)` searches one count."""
    seen: dict[int, Count] = {}

    def at(n: int, lean: bool = False) -> Count:
        c = seen.get(n)
        if c is None or (not lean and not c.full and c.why_not is None):
            c = seen[n] = probe(n, lean)
        return c

    if target is not None and objective == "time":
        question = f"the fewest devices predicted to reach {target:,.0f} tokens/s"
        lo, hi = 0, len(counts)  # the answer's index lies in [lo, hi]; hi == len: none reaches it
        while lo < hi:
            mid = (lo + hi) // 2
            if at(counts[mid]).tokens_per_s() >= target:
                hi = mid
            else:
                lo = mid + 1
        chosen = at(counts[hi]) if hi < len(counts) else None
    elif objective == "cost":
        question = "the count with the cheapest predicted $/Mtok" + (
            f" of those reaching {target:,.0f} tokens/s" if target is not None else ""
        )
        done = [at(n) for n in counts]
        ok = [c for c in done if c.best("cost") is not None and (target is None or c.tokens_per_s() >= target)]
        priced = [c for c in ok if c.best("cost").row.get("predicted_usd_per_mtok") is not None]
        chosen = min(priced, key=lambda c: c.best("cost").row["predicted_usd_per_mtok"]) if priced else None
    else:
        question = "the fewest devices on which a candidate fits"
        chosen = None
        for n in counts:
            if at(n, lean=True).why_not is None:
                chosen = at(n)
                break
    return Choice(question, seen, chosen, counts)


def no_answer(choice: Choice, objective: str, target: float | None, hardware: str) -> ConfigError:
    """Exit 2: no count answers; names the best that was reached and what would help."""
    tried = ", ".join(map(str, choice.tried))
    fits = [c for c in choice.counts.values() if c.best(objective) is not None]
    if target is not None and fits:
        top = max(fits, key=Count.tokens_per_s)
        return ConfigError(
            f"--target-tokens-per-s: {target:,.0f} tokens/s is not reached on {tried} x {hardware}: the best "
            f"predicted is {top.tokens_per_s():,.0f} on {top.devices} devices ({top.best('time').cand.label()}); "
            "allowed: a lower target, or more devices (--devices)"
        )
    if not choice.counts:
        return ConfigError(f"no feasible candidate: no count of {tried} was searched")
    last = choice.counts[max(choice.counts)]
    return ConfigError(f"no feasible candidate on any of {tried} x {hardware}; on {last.devices}: {last.why_not}")


def count_lines(choice: Choice, objective: str) -> list[str]:
    """The table of counts: what each count looked at came to (every figure predicted)."""
    out = [f"devices: {choice.question}; counts {', '.join(map(str, choice.tried))}", f"  {'devices':>7}  outcome"]
    for n in choice.tried:
        c = choice.counts.get(n)
        if c is None:
            what = "not searched"
        elif c.why_not is not None:
            what = f"nothing fits: {c.note or c.why_not}"
        elif not c.full:
            what = "fits (leanest corners only)"
        else:
            b = c.best(objective)
            r = b.row
            usd = r.get("predicted_usd_per_mtok")
            step = r.get("predicted_step_time_s")
            what = (
                f"best {b.cand.label()}: "
                + (f"{step:.3g} s/step, {c.tokens_per_s():,.0f} tokens/s" if step is not None else "unpriced")
                + (f", ${usd:.3f}/Mtok" if usd is not None else "")
            )
        mark = " <-" if choice.chosen is not None and n == choice.chosen.devices else ""
        out.append(f"  {n:>7}  {what}{mark}")
    return out
