"""The time model against measured steps on this CPU: `txlab calibrate` first (the local profile, written
under --out), then GPT-2-small shapes cut to 2-4 layers at 1024-4096 tokens under sdpa / checkpoint /
selective / recompute, on one rank and on two (FSDP2 over gloo), each measured (1 warm-up step, then the
median of 3) and predicted from the same config (`estimate_trial` with `measure.hardware` = the profile: the
trace of the real step on fake tensors, priced on the calibrated tables).

    python benchmarks/time_model.py [--quick] [--out results/benchmarks/time_model]

Every rank computes with one thread (a two-rank trial's ranks take one core each on this 2-core machine).
A step is timed twice: wall clock (what a row's step_time_s reports) and the process's CPU time (its threads'
and, for two ranks, gloo's: what the step takes on cores nobody else uses). The machine is shared, so the wall
time is the CPU time stretched by the other processes' load; the load average is printed with each trial.
The profile is calibrated in CPU time too (txlab.timemodel.calibrate). The claim checked: prediction within
35% of the measured median, and the policies of one shape in the measured order wherever their medians differ
by more than their spread. Each step's kernel CPU time and new pages (minor faults) are recorded too: the
trace prices first-touched pages (txlab.timemodel.trace.FRESH_MIN), and these say whether a gap is there.
`--only 'sdpa 2L 2048 1r' ...` runs named trials.

Writes local.yaml, rows.parquet (one row per trial: measured and predicted, with loads) and
time_model.png (predicted vs measured, both clocks), and prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import _common as C  # noqa: E402
import torch  # noqa: E402

BASE = {"model.size": "gpt2-small", "workload.batch_size": 1, "measure.device": "cpu", "workload.dtype": "fp32"}
# (label, layers, tokens, policy, ranks)
TRIALS = [
    ("sdpa", 2, 1024, "sdpa", 1),
    ("checkpoint", 2, 1024, "checkpoint", 1),
    ("selective", 2, 1024, "selective", 1),
    ("recompute", 2, 1024, "recompute", 1),
    ("sdpa", 4, 1024, "sdpa", 1),
    ("checkpoint", 4, 1024, "checkpoint", 1),
    ("sdpa", 2, 2048, "sdpa", 1),
    ("recompute", 2, 2048, "recompute", 1),
    ("recompute", 2, 4096, "recompute", 1),
    ("sdpa", 2, 1024, "sdpa", 2),
    ("checkpoint", 2, 1024, "checkpoint", 2),
]
QUICK = [t for t in TRIALS if t[1] == 2 and t[2] == 1024]
WARMUP, STEPS = 1, 3
TOLERANCE = 0.35
TICKS = [x * 10**e for e in range(-2, 4) for x in (1, 1.5, 2, 3, 5, 7)]  # labelled seconds on the plot


def overrides(layers: int, tokens: int, policy: str, ranks: int) -> dict:
    return {**BASE, "model.n_layers": layers, "workload.seq_len": tokens, "policy.name": policy,
            "parallel.fsdp": ranks, "workload.batch_size": ranks}  # fmt: skip


def label(name: str, layers: int, tokens: int, ranks: int) -> str:
    return f"{name} {layers}L {tokens} {ranks}r"


def chosen(args) -> list[tuple]:
    trials = QUICK if args.quick else TRIALS
    if not args.only:
        return trials
    names = {label(t[0], t[1], t[2], t[4]): t for t in TRIALS}
    unknown = [n for n in args.only if n not in names]
    if unknown:
        sys.exit(f"--only: unknown trial {unknown[0]!r}; the trials: {', '.join(names)}")
    return [names[n] for n in args.only]


def time_steps(parts, clock_cpu, who: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """WARMUP untimed steps, then STEPS timed ones: wall seconds, CPU seconds, the kernel's share of the CPU
    seconds and the bytes of new pages touched (minor faults x 4 KiB; rusage of `who`) of each."""
    for _ in range(WARMUP):
        parts.step(*parts.data.next())
    wall, cpu, sys_s, faulted = [], [], [], []
    for _ in range(STEPS):
        x, y = parts.data.next()
        r0, w0, c0 = resource.getrusage(who), time.perf_counter(), clock_cpu()
        parts.step(x, y)
        wall.append(time.perf_counter() - w0)
        cpu.append(clock_cpu() - c0)
        r1 = resource.getrusage(who)
        sys_s.append(r1.ru_stime - r0.ru_stime)
        faulted.append((r1.ru_minflt - r0.ru_minflt) * 4096)
    return wall, cpu, sys_s, faulted


def one_rank(over: dict) -> tuple[list[float], ...]:
    from txlab.config import load_config
    from txlab.trial.build import build_trial
    from txlab.trial.resolve import resolve

    parts = build_trial(resolve(load_config(None, over)))
    return time_steps(parts, time.thread_time, resource.RUSAGE_THREAD)


def _rank(rank: int, world: int, over: dict) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from txlab.config import load_config
    from txlab.parallel.fsdp import Ranks
    from txlab.trial.build import build_trial
    from txlab.trial.resolve import resolve

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        parts = build_trial(
            resolve(load_config(None, over)), ranks=Ranks(rank, world, init_device_mesh("cpu", (world,)))
        )
        wall, cpu, sys_s, faulted = time_steps(parts, time.process_time, resource.RUSAGE_SELF)  # with gloo's threads
    finally:
        dist.destroy_process_group()
    return {"wall": wall, "cpu": cpu, "sys": sys_s, "faulted": faulted}


def two_ranks(over: dict) -> tuple[list[float], ...]:
    from txlab.parallel.launch import spawn_ranks

    results = spawn_ranks(_rank, 2, (over,))
    if not all(isinstance(r, dict) for r in results):
        raise RuntimeError(f"ranks failed: {results}")
    # the ranks step together: each step takes the slower rank's time
    return tuple([max(r[k][i] for r in results) for i in range(STEPS)] for k in ("wall", "cpu", "sys", "faulted"))


def predicted(over: dict, profile: Path) -> dict:
    from txlab.config import load_config
    from txlab.trial import estimate_trial

    row = estimate_trial(load_config(None, {**over, "measure.hardware": str(profile)}))
    assert row["status"] == "ok", row["error"]
    return row


def ordering(rows: list[dict], clock: str) -> tuple[int, int, list[str]]:
    """Pairs of policies of one shape whose measured medians differ by more than both spreads (max - min):
    how many, how many the prediction orders the same way, and the ones it does not."""
    pairs = ok = 0
    wrong = []
    for a, b in itertools.combinations(rows, 2):
        if (a["layers"], a["tokens"], a["ranks"]) != (b["layers"], b["tokens"], b["ranks"]):
            continue
        gap = abs(a[f"{clock}_s"] - b[f"{clock}_s"])
        if gap <= max(a[f"{clock}_spread_s"], b[f"{clock}_spread_s"]):
            continue
        pairs += 1
        same = (a[f"{clock}_s"] < b[f"{clock}_s"]) == (a["predicted_s"] < b["predicted_s"])
        ok += same
        if not same:
            wrong.append(f"{a['name']} vs {b['name']} ({a['layers']}L {a['tokens']} tok, {a['ranks']} rank)")
    return pairs, ok, wrong


def plot(frame, path: Path) -> None:
    """Predicted vs measured, CPU time and wall time side by side; points numbered, the key below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 6.2), sharey=True)
    lo = min(frame["predicted_s"].min(), frame["cpu_min_s"].min(), frame["wall_min_s"].min()) * 0.8
    hi = max(frame["predicted_s"].max(), frame["cpu_max_s"].max(), frame["wall_max_s"].max()) * 1.25
    seconds = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, clock, title in ((axes[0], "cpu", "measured CPU time"), (axes[1], "wall", "measured wall time")):
        xs = [lo, hi]
        ax.plot(xs, xs, color="0.3", lw=1, label="predicted = measured")
        ax.fill_between(xs, [x / (1 + TOLERANCE) for x in xs], [x * (1 + TOLERANCE) for x in xs], color="0.9",
                        label=f"within {TOLERANCE:.0%}")  # fmt: skip
        for ranks, marker in ((1, "o"), (2, "s")):
            sub = frame[frame["ranks"] == ranks]
            ax.errorbar(sub[f"{clock}_s"], sub["predicted_s"],
                        xerr=[sub[f"{clock}_s"] - sub[f"{clock}_min_s"], sub[f"{clock}_max_s"] - sub[f"{clock}_s"]],
                        fmt=marker, ms=6, capsize=2, label=f"{ranks} rank{'s' if ranks > 1 else ''} (bar: min-max)")  # fmt: skip
        for i, r in frame.reset_index(drop=True).iterrows():
            ax.annotate(str(i + 1), (r[f"{clock}_s"], r["predicted_s"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), title=title,
               xlabel=f"{title} per step (s, median of {STEPS}; log scale)")  # fmt: skip
        for axis in (ax.xaxis, ax.yaxis):  # enough labelled ticks that the log scale reads as one
            axis.set_major_locator(FixedLocator([t for t in TICKS if lo <= t <= hi]))
            axis.set_major_formatter(seconds)
            axis.set_minor_locator(LogLocator(subs="all"))
            axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("predicted step time (s, local profile; log scale)")
    key = "   ".join(f"{i + 1}: {r['name']} {r['layers']}L {r['tokens']}" + (" 2 ranks" if r["ranks"] > 1 else "")
                     for i, r in frame.reset_index(drop=True).iterrows())  # fmt: skip
    fig.text(0.5, 0.01, key, ha="center", fontsize=7.5, wrap=True)
    load = f"load {frame['load_before'].min():.1f}-{frame['load_after'].max():.1f} on {os.cpu_count()} cores"
    fig.suptitle(f"txlab time model vs measured steps, GPT-2-small shapes, this CPU, 1 thread a rank ({load})",
                 fontsize=11)  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict]) -> None:
    """The table and the two claims (within 35%, the policies' order), against both clocks."""
    print()
    print(f"{'trial':28s} {'predicted':>9s} {'cpu med':>8s} {'(min-max)':>13s} {'err':>6s} {'wall med':>8s} "
          f"{'err':>6s} {'load':>9s}")  # fmt: skip
    for r in rows:
        print(f"{r['name']:10s} {r['layers']}L {r['tokens']:5d} {r['ranks']} rank{'s' if r['ranks'] > 1 else ' '}   "
              f"{r['predicted_s']:9.2f} {r['cpu_s']:8.2f} {r['cpu_min_s']:6.2f}-{r['cpu_max_s']:<6.2f} "
              f"{r['error_vs_cpu']:+6.0%} {r['wall_s']:8.2f} {r['error_vs_wall']:+6.0%} "
              f"{r['load_before']:4.1f}-{r['load_after']:<4.1f}")  # fmt: skip
    for clock in ("cpu", "wall"):
        errs = [abs(r[f"error_vs_{clock}"]) for r in rows]
        within = sum(e <= TOLERANCE for e in errs)
        pairs, ok, wrong = ordering(rows, clock)
        print(f"vs {clock:4s} time: {within}/{len(rows)} within {TOLERANCE:.0%} (median |error| "
              f"{statistics.median(errs):.0%}, worst {max(errs):.0%}); policy pairs apart beyond their spread: "
              f"{pairs}, ordered as measured: {ok}" + (f" (not: {'; '.join(wrong)})" if wrong else ""))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the 2-layer, 1024-token trials only")
    p.add_argument("--only", nargs="+", metavar="TRIAL", help="these trials only, named as the table names them: "
                   "'sdpa 2L 2048 1r' (policy, layers, tokens, ranks)")  # fmt: skip
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "time_model"))
    p.add_argument("--profile", help="use this profile instead of calibrating now")
    p.add_argument("--from", dest="stored", help="reprint and redraw a stored rows.parquet, running nothing")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stored:
        import pandas as pd

        rows = pd.read_parquet(args.stored).to_dict("records")
        report(rows)
        plot(pd.DataFrame(rows), out / "time_model.png")
        print(f"wrote {out / 'time_model.png'}")
        return
    torch.set_num_threads(1)
    print(C.machine_line())
    t_start = time.perf_counter()
    if args.profile:
        profile = Path(args.profile)
    else:
        from txlab.timemodel.calibrate import calibrate, summary, write_profile

        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        profile = write_profile(calibrate("cpu"), out / "local.yaml")
        print(
            f"calibrated in {time.perf_counter() - t0:.0f} s (load {load0:.2f} -> {os.getloadavg()[0]:.2f}): {profile}"
        )
        import yaml

        for line in summary(yaml.safe_load(profile.read_text())):
            print("  " + line)
    rows = []
    for name, layers, tokens, policy, ranks in chosen(args):
        over = overrides(layers, tokens, policy, ranks)
        pred = predicted(over, profile)
        load_before = os.getloadavg()[0]
        wall, cpu, sys_s, faulted = (one_rank if ranks == 1 else two_ranks)(over)
        load_after = os.getloadavg()[0]
        row = {"name": name, "layers": layers, "tokens": tokens, "ranks": ranks, "policy.name": policy,
               "predicted_s": pred["predicted_step_time_s"], "predicted_exposed_comm_s": pred["predicted_exposed_comm_s"],
               "load_before": load_before, "load_after": load_after, "sys_s": statistics.median(sys_s),
               "faulted_bytes": statistics.median(faulted)}  # fmt: skip
        for clock, ts in (("wall", wall), ("cpu", cpu)):
            row.update({f"{clock}_s": statistics.median(ts), f"{clock}_min_s": min(ts), f"{clock}_max_s": max(ts),
                        f"{clock}_spread_s": max(ts) - min(ts), f"{clock}_steps": ts})  # fmt: skip
            row[f"error_vs_{clock}"] = row["predicted_s"] / row[f"{clock}_s"] - 1
        rows.append(row)
        print(f"  {name:10s} {layers}L {tokens:5d} tok {ranks} rank  predicted {row['predicted_s']:6.2f} s  "
              f"cpu {row['cpu_s']:6.2f} s ({row['error_vs_cpu']:+.0%})  wall {row['wall_s']:6.2f} s "
              f"({row['error_vs_wall']:+.0%})  load {load_before:.1f}-{load_after:.1f}  kernel {row['sys_s']:.2f} s, "
              f"new pages {row['faulted_bytes'] / 1e9:.2f} GB", flush=True)  # fmt: skip
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.to_parquet(out / "rows.parquet", index=False)
    report(rows)
    plot(frame, out / "time_model.png")
    print(f"wrote {out / 'rows.parquet'}, {out / 'time_model.png'} ({time.perf_counter() - t_start:.0f} s in all)")
    print(C.machine_line())


if __name__ == "__main__":
    main()
