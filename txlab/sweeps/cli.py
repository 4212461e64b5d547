"""`txlab sweep` and `txlab rerun` (dispatched lazily from txlab.cli). Each returns an exit code; bad input
raises ConfigError (exit 2, one line)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from txlab.config import ConfigError, all_keys, config_from_flat, parse_override, set_dotted
from txlab.units import GiB


def default_store(name: str) -> str:
    return os.path.join("results", name)


def default_plots(name: str) -> str:
    """Where the plots of sweep `name` go: beside `results/`, never inside a store (which holds rows only)."""
    return os.path.join("plots", name)


def next_steps(store: str, name: str) -> str:
    """The sweep's closing hint: the README's plot and report commands for this store."""
    out = default_plots(name)
    return (
        f"plots: txlab plot --store {store} --out {out}; report: txlab report --store {store} --out {out}/report.html"
    )


def _in_ray_job_working_dir(store: str) -> bool:
    """`ray job submit --working-dir .` runs the driver inside a temporary copy that Ray deletes later."""
    return (
        bool(os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_JOB_SUBMISSION_ID"))
        and "://" not in store
        and not os.path.isabs(store)
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from txlab.sweeps.cluster import check_address
    from txlab.sweeps.driver import run_sweep
    from txlab.sweeps.dry_run import format_dry_run
    from txlab.sweeps.plan import plan
    from txlab.sweeps.spec import load_spec

    spec = load_spec(args.spec)
    if not args.dry_run:
        check_address(args.address)  # before the store is made
    store = args.store or default_store(spec.name)
    p = plan(spec, store, rerun_failed=args.rerun_failed)
    if args.dry_run:
        print(format_dry_run(p))
        return 0
    print(p.summary(), flush=True)
    if _in_ray_job_working_dir(store):
        print(
            f"warning: store {store!r} is relative to this Ray job's temporary working directory, which Ray deletes; "
            "pass --store /absolute/path or s3://bucket/prefix to keep the results",
            file=sys.stderr,
            flush=True,
        )
    if not p.to_run:
        print(
            f"nothing to run: every trial is in {store}"
            + ("" if args.rerun_failed else " (error rows rerun with --rerun-failed)")
        )
        return 0
    result = run_sweep(p, address=args.address)
    if result.store_error:
        print(f"error: {result.store_error}", file=sys.stderr)
        return 1
    print(f"store: {store} ({len(p.store)} rows); {next_steps(store, spec.name)}")
    from txlab.results.store import check_store

    check = check_store(store)
    print(check.summary(), flush=True)
    if not check.ok:
        print(f"error: store {store} failed its integrity check: {'; '.join(check.problems[:3])}", file=sys.stderr)
        return 1
    if result.interrupted:
        print("stopped before every trial finished; rerun the same command to resume", file=sys.stderr)
        return 130
    if result.counts.get("error"):
        print(
            f"{result.counts['error']} trial(s) ended in error (see the store's error column); "
            "rerun them with --rerun-failed",
            file=sys.stderr,
        )
        return 1
    return 0


# --- rerun ----------------------------------------------------------------------------------------

COMPARE = (
    ("status", None),
    ("device", None),
    ("threads", None),
    ("peak_bytes", "GiB"),
    ("activations_bytes", "GiB"),
    ("reserved_bytes", "GiB"),
    ("peak_rss_bytes", "GiB"),
    ("step_time_s", "s"),
    ("tokens_per_s", ""),
    ("mfu", ""),
    ("loss", ""),
    ("duration_s", "s"),
)


def _fmt(value: Any, unit: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "GiB":
        return f"{value / GiB:.4f} GiB"
    if isinstance(value, float):
        return f"{value:.4g}{' ' + unit if unit else ''}"
    return str(value)


def find_row(store_uri: str, key: str) -> dict[str, Any]:
    from txlab.results.store import Store

    rows = Store.open(store_uri).read().to_pylist()
    matches = [r for r in rows if r["trial_key"] == key] or [r for r in rows if r["trial_key"].startswith(key)]
    if not matches:
        raise ConfigError(f"--trial {key}: no such trial key in {store_uri} ({len(rows)} rows)")
    if len(matches) > 1:
        raise ConfigError(f"--trial {key}: prefix matches {len(matches)} trials in {store_uri}; give more characters")
    return matches[0]


def _match_threads(stored: Any) -> str:
    """Run with the CPU threads the stored trial ran with (a sweep's trial runs with its resources' CPUs,
    `txlab run` with torch's default: step times differ by that much); say what was done."""
    import torch

    if stored is None or (isinstance(stored, float) and math.isnan(stored)):
        return (
            "threads: the stored row does not say how many it ran with (written before txlab recorded it); this "
            f"run uses torch's default, {torch.get_num_threads()}: compare step times with care"
        )
    torch.set_num_threads(int(stored))
    return f"threads: {int(stored)}, as the stored trial ran"


def cmd_rerun(args: argparse.Namespace) -> int:
    from txlab.trial import run_trial

    stored = find_row(args.store, args.trial)
    keys = all_keys()
    flat = {k: stored[k] for k in keys if k in stored}
    check: dict[str, Any] = {}
    for text in args.overrides:
        k, v = parse_override(text)
        set_dotted(check, k, v)  # unknown keys fail here, naming the key
        flat[k] = v
    cfg = config_from_flat(flat)
    if cfg.trial_key != stored["trial_key"]:
        print(f"note: the overrides change the config: new trial key {cfg.trial_key} (stored {stored['trial_key']})")
    print(
        f"rerunning trial {stored['trial_key']} of sweep {stored.get('sweep') or '-'} "
        f"(stored: {stored['status']} on {stored.get('host') or '?'}, {stored.get('device') or '?'})",
        flush=True,
    )
    print(_match_threads(stored.get("threads")), flush=True)
    row = run_trial(cfg, progress=True)
    if stored.get("device") and row.get("device") != stored.get("device"):
        print(f"note: stored on {stored['device']}, rerun on {row['device']}: figures are not comparable one to one")
    width = max(len(c) for c, _ in COMPARE)
    print(f"{'':<{width}}  {'stored':>18}  {'rerun':>18}")
    for col, unit in COMPARE:
        print(f"{col:<{width}}  {_fmt(stored.get(col), unit):>18}  {_fmt(row.get(col), unit):>18}")
    if row.get("error"):
        print(f"error: {row['error']}")
    return 1 if row["status"] == "error" else 0
