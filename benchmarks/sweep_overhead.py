"""What does running a sweep through Ray Tune cost? The same trials two ways, each from a cold process:

  sequential  one Python process runs every trial of the spec one after another (`run_trial` in a loop)
  ray         `txlab sweep SPEC` as a user runs it: a local Ray instance, one fresh process per trial,
              as many at once as the spec's resources allow

Prints a table, writes the per-trial rows and the summary as Parquet and a plot:

    python benchmarks/sweep_overhead.py [--spec sweeps/smoke.yaml] [--out results/benchmarks/sweep_overhead]

Wall times include everything the user waits for (interpreter and torch import, Ray start and stop).
Not a test: the figures depend on the machine and on whatever else it is doing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sequential_phase(spec_path: str, store: str) -> None:
    """Child process: every trial of the spec, one after another, rows into `store`."""
    from txlab.results.columns import column_names
    from txlab.results.store import Store
    from txlab.sweeps.spec import expand, load_spec
    from txlab.trial import run_trial

    spec = load_spec(spec_path)
    st = Store.open(store, create=True)
    names = set(column_names())
    for trial in expand(spec).trials:
        row = run_trial(trial.config)
        row["sweep"] = spec.name
        st.write_row({k: v for k, v in row.items() if k in names})


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    return time.perf_counter() - t0, proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(REPO / "sweeps" / "smoke.yaml"))
    ap.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "sweep_overhead"))
    ap.add_argument("--order", choices=["sequential-first", "ray-first"], default="sequential-first")
    args = ap.parse_args()

    import pandas as pd

    from txlab.results.store import Store
    from txlab.sweeps.spec import expand, load_spec

    spec = load_spec(args.spec)
    n_trials = len(expand(spec).trials)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="txlab-bench-"))
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    stores = {"sequential": str(work / "sequential"), "ray": str(work / "ray")}
    commands = {
        "sequential": [sys.executable, __file__, "--_sequential", args.spec, stores["sequential"]],
        "ray": [sys.executable, "-m", "txlab.cli", "sweep", args.spec, "--store", stores["ray"]],
    }
    order = ["sequential", "ray"] if args.order == "sequential-first" else ["ray", "sequential"]
    walls: dict[str, float] = {}
    try:
        for mode in order:
            print(f"running {n_trials} trials of {spec.name}: {mode} ...", flush=True)
            wall, rc, log = timed(commands[mode], env)
            if rc != 0:
                print(log[-4000:], file=sys.stderr)
                print(f"{mode} failed with exit status {rc}", file=sys.stderr)
                return 1
            walls[mode] = wall
        frames = []
        for mode in order:
            df = Store.open(stores[mode]).read_pandas()[
                [
                    "trial_key",
                    "status",
                    "duration_s",
                    "step_time_s",
                    "peak_bytes",
                    "workload.seq_len",
                    "policy.name",
                    "measure.budget_gib",
                    "host",
                ]
            ]
            df.insert(0, "mode", mode)
            frames.append(df)
        trials = pd.concat(frames, ignore_index=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpus = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    summary = pd.DataFrame(
        [
            {
                "mode": mode,
                "spec": spec.name,
                "trials": n_trials,
                "wall_s": walls[mode],
                "sum_trial_s": trials.loc[trials["mode"] == mode, "duration_s"].sum(),
                "ratio_to_sequential": walls[mode] / walls["sequential"],
                "cpus": cpus,
                "load_avg_1m_after": load,
                "python": platform.python_version(),
            }
            for mode in ["sequential", "ray"]
        ]
    )
    summary["overhead_per_trial_s"] = (summary["wall_s"] - summary["wall_s"].iloc[0]) / n_trials

    print()
    print(f"{'mode':<11} {'trials':>6} {'wall s':>8} {'sum of trial s':>15} {'x sequential':>13}")
    for r in summary.itertuples():
        print(f"{r.mode:<11} {r.trials:>6} {r.wall_s:>8.1f} {r.sum_trial_s:>15.1f} {r.ratio_to_sequential:>13.2f}")
    for mode in ["sequential", "ray"]:
        counts = trials.loc[trials["mode"] == mode, "status"].value_counts().to_dict()
        print(f"{mode} statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(
        f"({cpus} CPUs, 1-minute load average {load:.1f} after the runs; trial time in the ray column is per process, "
        "trials overlap)"
    )

    summary.to_parquet(out / "summary.parquet", index=False)
    trials.to_parquet(out / "trials.parquet", index=False)
    _plot(summary, trials, out / "sweep_overhead.png")
    (out / "summary.json").write_text(json.dumps(summary.to_dict(orient="records"), indent=2, default=float))
    print(f"wrote {out}/summary.parquet, trials.parquet, sweep_overhead.png")
    return 0


def _plot(summary, trials, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    modes = list(summary["mode"])
    ax1.bar(modes, summary["wall_s"], color=["#4c72b0", "#dd8452"], label="wall time")
    ax1.bar(modes, summary["sum_trial_s"], color="none", edgecolor="black", hatch="//", label="sum of trial durations")
    for i, r in enumerate(summary.itertuples()):
        ax1.text(i, r.wall_s, f"{r.wall_s:.0f} s (x{r.ratio_to_sequential:.2f})", ha="center", va="bottom")
    ax1.set_ylabel("seconds")
    ax1.set_title(f"{summary['spec'].iloc[0]}: {summary['trials'].iloc[0]} trials")
    ax1.legend(loc="lower right", fontsize=8)
    wide = trials.pivot_table(index="trial_key", columns="mode", values="duration_s")
    ax2.scatter(wide["sequential"], wide["ray"], s=18)
    top = float(max(wide.max().max(), 1.0))
    ax2.plot([0, top], [0, top], color="grey", lw=1, ls="--", label="equal")
    ax2.set_xlabel("trial duration, sequential (s)")
    ax2.set_ylabel("trial duration, in its Ray trial process (s)")
    ax2.set_title("per trial")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--_sequential":
        sequential_phase(sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit(main())
