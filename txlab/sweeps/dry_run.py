"""`txlab sweep SPEC --dry-run`: the plan as text (counts, every skipped point with its rule, every
dropped point with its unused chunk size, every duplicate, every trial with its key and state, what each trial asks of Ray). Runs and creates nothing."""

from __future__ import annotations

from txlab.sweeps.placement import per_trial
from txlab.sweeps.plan import Plan


def format_dry_run(plan_: Plan) -> str:
    e = plan_.expansion
    lines = [plan_.summary() + " (all trial configs valid)"]
    for point, rule in e.skipped:
        lines.append("  skipped    " + " ".join(f"{k}={v}" for k, v in point.items()) + f"   [skip_if: {rule}]")
    for point, why in e.unused:
        lines.append("  dropped    " + " ".join(f"{k}={v}" for k, v in point.items()) + f"   [{why}]")
    for key, n in e.unapplied.items():
        lines.append(f"  base {key} not applied to {n} trial(s): their policy does not use it")
    for point, key in e.duplicates:
        lines.append("  duplicate  " + " ".join(f"{k}={v}" for k, v in point.items()) + f"   [same config as {key}]")
    to_run = {t.key for t in plan_.to_run}
    for t in e.trials:
        state = "run" if t.key in to_run else f"stored ({plan_.stored.get(t.key)})"
        lines.append(f"  {state:<20} {t.key}  {t.label()}")
    spec = plan_.spec
    lines.append(
        f"resources: {per_trial(spec, plan_.to_run)}; max_concurrent {spec.max_concurrent or 'unlimited'}; "
        f"max_failures {spec.max_failures}; store {plan_.store.uri}"
    )
    return "\n".join(lines)
