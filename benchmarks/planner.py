"""Does the planner beat the fixed recomputation policies? A depth x budget grid of gpt2-small shapes on
this machine: for each depth, every fixed policy (none, every k for k = 1..4, sqrt, selective) is measured
once (`run_trial`: peak and median step time); for each budget, `planned` is measured with that budget.
A fixed policy fits a budget when its measured peak is at most the budget.

    python benchmarks/planner.py [--depths 4 8 12] [--seq-len 512] [--vocab 50257] [--out results/benchmarks/planner]

Prints, per (depth, budget), the best fitting `every k`/`sqrt` policy and its step time beside the
planner's, and whether the planner fits wherever they do with step time no higher than theirs + 5%.
Writes rows.parquet, table.parquet and tradeoff.png (step time vs peak, all policies, planner points
marked, budgets as vertical lines). Step times depend on the machine and what else it runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from txlab.units import GiB


def fixed_policies(L: int) -> dict[str, dict]:
    out = {"none": {"policy.remat": "none"}}
    for k in range(1, min(4, L) + 1):
        out[f"every{k}"] = {"policy.remat": "every", "policy.remat_every": k}
    out["sqrt"] = {"policy.remat": "sqrt"}
    out["selective"] = {"policy.remat": "selective"}
    return {
        name: {"policy.name": "custom", "policy.attention": "sdpa", "policy.loss": "full", **o}
        for name, o in out.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 8, 12])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument(
        "--budgets", type=int, default=3, help="budgets per depth, between recompute-all and keep-all peaks"
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=50257, help="vocabulary (a small one saves CPU time on the logits)")
    ap.add_argument("--out", default="results/benchmarks/planner")
    args = ap.parse_args()

    import pandas as pd

    from txlab.config import load_config
    from txlab.trial import run_trial

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {
        "model.size": "gpt2-small",
        "workload.seq_len": args.seq_len,
        "measure.device": "cpu",
        "workload.steps": args.steps,
        "workload.warmup_steps": args.warmup,
        "model.vocab_size": args.vocab,
    }
    rows, table = [], []
    t0 = time.perf_counter()
    for L in args.depths:
        fixed = {}
        for name, over in fixed_policies(L).items():
            row = run_trial(load_config(None, {**base, "model.n_layers": L, **over}))
            assert row["status"] == "ok", row["error"]
            fixed[name] = row
            rows.append(
                {
                    "depth": L,
                    "policy": name,
                    "budget_gib": None,
                    "peak_gib": row["peak_bytes"] / GiB,
                    "step_time_s": row["step_time_s"],
                    "plan": None,
                    "status": row["status"],
                }
            )
            print(
                f"L{L:3d} {name:10s} peak {row['peak_bytes'] / GiB:7.3f} GiB  step {row['step_time_s']:.3f} s",
                flush=True,
            )
        lo = min(r["peak_bytes"] for r in fixed.values())
        hi = fixed["none"]["peak_bytes"]
        budgets = [lo + (hi - lo) * (i + 0.5) / args.budgets for i in range(args.budgets)] + [lo * 0.999]
        for budget in budgets:
            cfg = load_config(
                None, {**base, "model.n_layers": L, "policy.name": "planned", "measure.budget_gib": budget / GiB}
            )
            row = run_trial(cfg)
            rows.append(
                {
                    "depth": L,
                    "policy": "planned",
                    "budget_gib": budget / GiB,
                    "peak_gib": None if row["peak_bytes"] is None else row["peak_bytes"] / GiB,
                    "step_time_s": row["step_time_s"],
                    "plan": row["plan"],
                    "status": row["status"],
                }
            )
            fits = {n: r for n, r in fixed.items() if n.startswith(("every", "sqrt")) and r["peak_bytes"] <= budget}
            best = min(fits.items(), key=lambda kv: kv[1]["step_time_s"]) if fits else None
            planned_fits = row["status"] == "ok" and row["peak_bytes"] <= budget
            rec = {
                "depth": L,
                "budget_gib": budget / GiB,
                "best_fixed": best[0] if best else None,
                "best_fixed_step_s": best[1]["step_time_s"] if best else None,
                "planned_status": row["status"],
                "planned_fits": planned_fits,
                "planned_peak_gib": None if row["peak_bytes"] is None else row["peak_bytes"] / GiB,
                "planned_step_s": row["step_time_s"],
                "plan": row["plan"] or row["error"],
            }
            rec["ok"] = (best is None) or (planned_fits and row["step_time_s"] <= 1.05 * best[1]["step_time_s"])
            table.append(rec)
            print(
                f"L{L:3d} budget {budget / GiB:7.3f} GiB  best fixed {rec['best_fixed']} "
                f"{rec['best_fixed_step_s'] or float('nan'):.3f} s  planned {row['status']} "
                f"{row['step_time_s'] or float('nan'):.3f} s  {'OK' if rec['ok'] else 'WORSE'}  {rec['plan']}",
                flush=True,
            )
    pd.DataFrame(rows).to_parquet(out / "rows.parquet")
    tab = pd.DataFrame(table)
    tab.to_parquet(out / "table.parquet")
    print(f"\n{len(rows)} trials, {time.perf_counter() - t0:.0f} s")
    with pd.option_context("display.width", 200, "display.max_colwidth", 70):
        print(tab.drop(columns=["plan"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"planner fits wherever every/sqrt does, step time <= best + 5%: {int(tab['ok'].sum())}/{len(tab)}")
    plot(pd.DataFrame(rows), tab, out / "tradeoff.png")
    print(f"wrote {out}/rows.parquet, table.parquet, tradeoff.png")


def plot(rows, tab, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted(rows["depth"].unique())
    fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 4.2), squeeze=False)
    for ax, L in zip(axes[0], depths):
        g = rows[(rows["depth"] == L) & (rows["policy"] != "planned")]
        for r in g.itertuples():
            ax.scatter(r.peak_gib, r.step_time_s, s=22)
            ax.annotate(r.policy, (r.peak_gib, r.step_time_s), fontsize=7, xytext=(3, 3), textcoords="offset points")
        p = rows[(rows["depth"] == L) & (rows["policy"] == "planned") & (rows["status"] == "ok")]
        ax.scatter(p["peak_gib"], p["step_time_s"], marker="*", s=120, color="black", label="planned", zorder=3)
        for b in tab[tab["depth"] == L]["budget_gib"]:
            ax.axvline(b, color="grey", lw=0.6, ls=":")
        ax.set(
            xlabel="measured peak (GiB, 2^30 bytes)",
            ylabel="median step time (s)",
            title=f"gpt2-small shape, {L} layers",
        )
        ax.legend(fontsize=8)
    fig.suptitle("Step time vs peak: fixed recomputation policies and the planner (dotted: budgets)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
