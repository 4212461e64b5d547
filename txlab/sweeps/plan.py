"""Planning a sweep: the spec expanded into validated trial configs (txlab.sweeps.spec), the store opened,
and the trials already stored dropped. Nothing here touches Ray: a plan is complete and valid before any
trial starts."""

from __future__ import annotations

from dataclasses import dataclass

from txlab.results.columns import FINAL_STATUSES
from txlab.results.store import Store
from txlab.sweeps.spec import Expansion, SweepSpec, Trial, expand


@dataclass
class Plan:
    expansion: Expansion
    store: Store
    stored: dict[str, str]  # trial_key -> stored status, for this sweep's trials
    to_run: list[Trial]
    rerun_failed: bool

    @property
    def spec(self) -> SweepSpec:
        return self.expansion.spec

    def summary(self) -> str:
        e = self.expansion
        done = len(e.trials) - len(self.to_run)
        parts = [f"sweep {e.spec.name}: {e.spec.grid_size} grid points"]
        if e.skipped:
            parts.append(f"{len(e.skipped)} skipped by skip_if")
        if e.unused:
            parts.append(f"{len(e.unused)} dropped (a chunk size their policy does not use)")
        if e.duplicates:
            parts.append(f"{len(e.duplicates)} duplicate configs")
        parts.append(f"{len(e.trials)} trials")
        parts.append(f"{done} already in the store")
        parts.append(f"{len(self.to_run)} to run")
        return ", ".join(parts)


def plan(spec: SweepSpec, store_uri: str, rerun_failed: bool = False, create: bool = True) -> Plan:
    """The spec's trials and which of them run: those without a stored row with status ok, oom or
    over_budget (nor `error`, unless `rerun_failed`). Raises ConfigError for a point that does not validate."""
    expansion = expand(spec)  # raises ConfigError for a bad point: nothing has started
    store = Store.open(store_uri, create=create)
    statuses = store.statuses()
    keys = {t.key for t in expansion.trials}
    stored = {k: s for k, s in statuses.items() if k in keys}
    skip_statuses = set(FINAL_STATUSES) if rerun_failed else set(FINAL_STATUSES) | {"error"}
    to_run = [t for t in expansion.trials if stored.get(t.key) not in skip_statuses]
    return Plan(expansion, store, stored, to_run, rerun_failed)
