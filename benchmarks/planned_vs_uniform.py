"""`planned` against the uniform recomputation heuristics, on time, at budgets between `checkpoint`'s and
`sdpa`'s peaks: does the planner's plan fit each budget, and is its measured step time at most the
fastest fitting `every k`, `sqrt`, `selective` or `block`?

    python benchmarks/planned_vs_uniform.py                          # gpt2-small, 1024 tokens, 4 budgets, 3 reps
    python benchmarks/planned_vs_uniform.py --seq-len 2048 --budgets 3 --reps 5
    python benchmarks/planned_vs_uniform.py --from results/benchmarks/planned_vs_uniform/rows.parquet

One model and one AdamW (a full training step each time: forward, backward, optimizer step), gpt2-small
shapes, fp32, batch 1, sdpa attention, full loss; each contender is the same model with its blocks wrapped
its way (`apply_plan`), so all contenders share the weights and the optimizer state and the RAM is one
trial's. AdamW's state is made before anything is measured, so every peak is a steady step's, which is a
trial's peak (tests/test_estimate.py holds the two equal). Peak: txlab's MemoryMonitor over one step on
real tensors. Budgets: evenly inside (block's peak, none's peak); `planned` is planned for each by
`txlab.trial.plan.plan_trial` (the estimator checks its plan). Time: contenders interleaved per
repetition, the order rotating, after one warm-up round; median of --reps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

UNIFORM = ["none", "block", "every2", "every3", "every4", "sqrt", "selective"]


def uniform_runs(name: str, L: int) -> list[tuple[int, int, str]]:
    from txlab.trial.plan import uniform_plan

    if name.startswith("every"):
        return uniform_plan(L, "every", int(name.removeprefix("every")))
    return uniform_plan(L, name)


def base_config(
    seq_len: int, vocab: int, n_layers: int, budget_gib: float | None = None, remat: str = "none", size="gpt2-small"
):
    from txlab.config import load_config

    return load_config(
        None,
        {
            "model.size": size,
            "model.n_layers": n_layers,
            "model.vocab_size": vocab,
            "workload.seq_len": seq_len,
            "measure.device": "cpu",
            "policy.name": "custom",
            "policy.attention": "sdpa",
            "policy.loss": "full",
            "policy.remat": remat,
            "measure.budget_gib": budget_gib,
        },
    )


class Shared:
    """One model and optimizer; `use(runs)` rewraps the original blocks by a plan."""

    def __init__(self, cfg):

        from txlab.trial.build import build_trial
        from txlab.trial.fake import make_optimizer_state
        from txlab.trial.resolve import resolve

        self.parts = build_trial(resolve(cfg))
        self.blocks = list(self.parts.model.blocks)
        make_optimizer_state(self.parts.optimizer)  # the state exists from the start: steady steps only

    def use(self, runs):
        import torch.nn as nn

        from txlab.policy.remat import apply_plan

        self.parts.model.blocks = nn.ModuleList(self.blocks)
        apply_plan(self.parts.model, runs)

    def step(self):
        return self.parts.step(*self.parts.data.next())

    def peak(self, runs) -> dict:
        import dataclasses

        import torch

        from txlab.measure.memory import measure_steps

        self.use(runs)
        p = self.parts
        memory, _ = measure_steps(torch.device("cpu"), p.model, p.optimizer, [p.data.next()], p.step)
        return dataclasses.asdict(memory)


def run(seq_len: int, vocab: int, n_layers: int, n_budgets: int, reps: int, size: str = "gpt2-small", log: bool = True):
    import pandas as pd

    from txlab.trial.plan import plan_trial
    from txlab.trial.resolve import resolve

    shared = Shared(base_config(seq_len, vocab, n_layers, size=size))
    contenders = {name: uniform_runs(name, n_layers) for name in UNIFORM}
    peaks = {name: shared.peak(runs) for name, runs in contenders.items()}
    if log:
        for n, p in peaks.items():
            print(f"peak  {n:<10} {p['peak_bytes'] / C.GiB:.3f} GiB", file=sys.stderr, flush=True)
    lo, hi = peaks["block"]["peak_bytes"], peaks["none"]["peak_bytes"]
    budgets = [lo + (hi - lo) * (i + 1) / (n_budgets + 1) for i in range(n_budgets)]
    plans = {}
    for b in budgets:
        t0 = time.perf_counter()
        plan = plan_trial(resolve(base_config(seq_len, vocab, n_layers, b / C.GiB, "planned", size), True))
        name = f"planned@{b / C.GiB:.3f}"
        contenders[name] = plan.runs
        plans[name] = (b, plan, time.perf_counter() - t0)
        peaks[name] = shared.peak(plan.runs)
        if log:
            print(f"plan  {name}: {plan.describe()}  ({plans[name][2]:.0f} s)", file=sys.stderr, flush=True)

    def timed(runs):
        def go():
            shared.use(runs)
            shared.step()

        return go

    times = C.interleaved({n: timed(r) for n, r in contenders.items()}, reps, warmup=1, log=log)
    machine = C.machine()
    rows = []
    for n, runs in contenders.items():
        b, plan, plan_s = plans.get(n, (None, None, None))
        rows.append(
            {
                "contender": n,
                "policy": "planned" if n.startswith("planned") else n,
                "budget_GiB": None if b is None else b / C.GiB,
                "peak_GiB": peaks[n]["peak_bytes"] / C.GiB,
                "plan": plan.describe() if plan else " ".join(f"{a}-{z - 1}:{m}" for a, z, m in runs),
                "plan_s": plan_s,
                "recomputed_blocks": sum(z - a for a, z, m in runs if m != "keep"),
                **C.spread(times[n]),
                "seq_len": seq_len,
                "n_layers": n_layers,
                "vocab": vocab,
                "size": size,
                **{f"machine_{k}": v for k, v in machine.items()},
            }
        )
    return pd.DataFrame(rows)


def per_budget(rows):
    """Per budget: planned's fit and time against the fastest uniform heuristic that fits."""
    import pandas as pd

    uni = rows[
        rows["budget_GiB"].isna() & rows["policy"].isin(["block", "every2", "every3", "every4", "sqrt", "selective"])
    ]
    out = []
    for r in rows[rows["budget_GiB"].notna()].itertuples():
        fits = uni[uni["peak_GiB"] <= r.budget_GiB]
        best = fits.loc[fits["time_s"].idxmin()] if len(fits) else None
        out.append(
            {
                "budget_GiB": r.budget_GiB,
                "planned_peak_GiB": r.peak_GiB,
                "planned_fits": r.peak_GiB <= r.budget_GiB,
                "planned_time_s": r.time_s,
                "planned_spread": r.spread,
                "fastest_uniform": None if best is None else best["policy"],
                "uniform_peak_GiB": None if best is None else best["peak_GiB"],
                "uniform_time_s": None if best is None else best["time_s"],
                "uniform_spread": None if best is None else best["spread"],
                "time_vs_fastest_uniform": None if best is None else r.time_s / best["time_s"],
                "plan": r.plan.split(" | ")[0],
            }
        )
    tab = pd.DataFrame(out)
    tab["holds"] = tab["planned_fits"] & (tab["time_vs_fastest_uniform"].fillna(0) <= 1.0)
    return tab


def show(rows, tab) -> None:
    C.print_table(
        rows[["contender", "peak_GiB", "recomputed_blocks", "time_s", "time_min_s", "time_max_s", "spread", "reps"]]
    )
    print("per budget (planned vs the fastest uniform heuristic that fits):")
    C.print_table(tab.drop(columns=["plan"]))
    for r in tab.itertuples():
        print(f"  {r.budget_GiB:.3f} GiB: {r.plan}")
    m = rows.iloc[0]
    print(
        f"{m['size']} x{m['n_layers']}, seq_len {m['seq_len']}, vocab {m['vocab']}; load at the end "
        f"{m['machine_load_1m']} (1 min) {m['machine_load_5m']} (5 min); goal holds at {int(tab['holds'].sum())}/{len(tab)} budgets"
    )


def plot(rows, tab, path: Path) -> Path:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    uni = rows[rows["budget_GiB"].isna()]
    ax.errorbar(
        uni["peak_GiB"],
        uni["time_s"],
        yerr=[uni["time_s"] - uni["time_min_s"], uni["time_max_s"] - uni["time_s"]],
        fmt="o",
        color="tab:blue",
        capsize=2,
        label="uniform heuristics",
    )
    for r in uni.itertuples():
        ax.annotate(r.contender, (r.peak_GiB, r.time_s), fontsize=7, xytext=(4, 4), textcoords="offset points")
    pl = rows[rows["budget_GiB"].notna()]
    ax.errorbar(
        pl["peak_GiB"],
        pl["time_s"],
        yerr=[pl["time_s"] - pl["time_min_s"], pl["time_max_s"] - pl["time_s"]],
        fmt="*",
        markersize=11,
        color="black",
        capsize=2,
        label="planned (one per budget)",
    )
    for b in tab["budget_GiB"]:
        ax.axvline(b, color="grey", lw=0.7, ls=":")
    m = rows.iloc[0]
    ax.set(
        xlabel="measured peak, GiB (2^30 B); dotted: the budgets",
        ylabel="median step time, s (whiskers min..max)",
        title=f"{m['size']} x{m['n_layers']}, {m['seq_len']} tokens, fp32 + AdamW: step time vs peak\n"
        f"(2 CPU cores, load {m['machine_load_1m']} at the end)",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    return C.save_fig(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="gpt2-small", help="model.size (debug for a smoke run)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--n-layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--budgets", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="results/benchmarks/planned_vs_uniform")
    ap.add_argument("--plot", default="docs/img/planned_vs_uniform.png")
    ap.add_argument("--from", dest="stored", help="reprint and redraw a stored rows.parquet; run nothing")
    args = ap.parse_args(argv)
    if args.stored:
        import pandas as pd

        rows = pd.read_parquet(args.stored)
    else:
        print(C.machine_line(), flush=True)
        rows = run(args.seq_len, args.vocab, args.n_layers, args.budgets, args.reps, args.size)
        print(C.machine_line())
        C.write_parquet(rows, Path(args.out), "rows")
    tab = per_budget(rows)
    show(rows, tab)
    if not args.stored:
        C.write_parquet(tab, Path(args.out), "per_budget")
    print(f"wrote {plot(rows, tab, Path(args.plot))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
