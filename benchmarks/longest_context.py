"""Longest trainable context under a memory budget: gpt2-small, batch 1, fp32, for Hugging Face GPT-2
(default attention, and with gradient checkpointing) and every txlab preset.

    python benchmarks/longest_context.py                                   # budgets 2 4 8 GiB, up to 131072 tokens
    python benchmarks/longest_context.py --max-len 8192                    # a quicker search, capped at 8192
    python benchmarks/longest_context.py --optimizer                       # the full train step with AdamW

What must fit: one forward + backward (weights, gradients, activations, temporaries: everything the tracker
sees), or with `--optimizer` two full training steps with AdamW (its state included). The tracked peak is
txlab's MemoryMonitor (torch's MemTracker) on fake tensors: exact byte accounting of every storage, no
arithmetic, nothing allocated, so searching 8 GiB points never touches the shared machine's RAM (the
fake and real peaks agree to the byte, see vs_hf_gpt2.py). The tracker is txlab's BudgetedTracker: a
step stops as soon as live tensors pass the budget.

Search: powers of two from 256 until a length does not fit (or `--max-len`), then bisection between the
last fit and the first miss to a 256-token step. The position table has `seq_len` rows for every
contender (HF n_positions = seq_len), so it is counted like txlab's. `>= N` means N fit and N was the cap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DEFAULT_VARIANTS = ["hf", "hf-gc", "naive", "sdpa", "checkpoint", "selective", "recompute"]


class Oracle:
    """Does `variant` fit `budget` at `T`? Remembers exact peaks (a completed step fits every budget above
    its peak) and misses (stopped at budget B: misses every budget up to B), so budgets share runs."""

    def __init__(self, variant: str, optimizer: bool, size: str, log: bool, overrides: dict | None = None):
        self.variant, self.optimizer, self.size, self.log, self.overrides = variant, optimizer, size, log, overrides
        self.peaks: dict[int, int] = {}
        self.misses: dict[int, int] = {}  # T -> the largest budget it was stopped at
        self.runs = 0
        self.seconds = 0.0

    def fits(self, T: int, budget: int) -> bool:
        if T in self.peaks:
            return self.peaks[T] <= budget
        if self.misses.get(T, -1) >= budget:
            return False
        r = C.measure_memory(
            self.variant,
            T,
            fake=True,
            budget_bytes=budget,
            optimizer=self.optimizer,
            size=self.size,
            overrides=self.overrides,
        )
        self.runs += 1
        self.seconds += r["measure_s"]
        if r["status"] == "ok":
            self.peaks[T] = r["peak_bytes"]
        else:
            self.misses[T] = max(budget, self.misses.get(T, -1))
        if self.log:
            print(
                f"  {C.label(self.variant):<18} T={T:<6} budget {budget / C.GiB:g} GiB: {r['status']} "
                f"({r['peak_bytes'] / C.GiB:.3f} GiB{'' if r['status'] == 'ok' else '+'}, {r['measure_s']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        return r["status"] == "ok"


def longest(oracle: Oracle, budget: int, start: int, step: int, max_len: int) -> tuple[int, bool]:
    """(longest fitting length, capped); 0 when even `start` does not fit."""
    lo, hi, T = 0, None, start
    while T <= max_len:
        if oracle.fits(T, budget):
            lo, T = T, T * 2
        else:
            hi = T
            break
    if hi is None:
        return lo, True
    if lo == 0:  # not even `start` fits
        return 0, False
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        if oracle.fits(mid, budget):
            lo = mid
        else:
            hi = mid
    return lo, False


def run(
    budgets_gib,
    variants,
    max_len: int,
    optimizer: bool = False,
    start: int = 256,
    step: int = 256,
    size: str = "gpt2-small",
    overrides: dict | None = None,
    log: bool = True,
):
    import pandas as pd

    rows = []
    for v in variants:
        oracle = Oracle(v, optimizer, size, log, overrides)
        for b in sorted(budgets_gib, reverse=True):  # the largest first: its exact peaks answer the smaller budgets
            budget = int(b * C.GiB)
            T, capped = longest(oracle, budget, start, step, max_len)
            rows.append(
                {
                    "variant": v,
                    "contender": C.label(v),
                    "budget_GiB": b,
                    "longest_seq_len": T,
                    "capped": capped,
                    "peak_at_longest_GiB": oracle.peaks[T] / C.GiB if T else None,
                    "shown": (f">= {T}" if capped else str(T) if T else f"< {start}"),
                    "max_len": max_len,
                    "step": "fwd+bwd+AdamW" if optimizer else "fwd+bwd",
                }
            )
        rows[-1]["search_runs"], rows[-1]["search_s"] = oracle.runs, oracle.seconds  # on the variant's last row
    df = pd.DataFrame(rows).sort_values(["budget_GiB"], kind="stable").reset_index(drop=True)
    for b, grp in df.groupby("budget_GiB"):
        base = grp[grp["variant"] == "hf"]
        if len(base) and base["longest_seq_len"].iloc[0]:
            df.loc[grp.index, "x_hf"] = grp["longest_seq_len"] / base["longest_seq_len"].iloc[0]
    return df


def wide(df):
    """Contenders down, budgets across, as printed."""
    t = df.pivot(index="contender", columns="budget_GiB", values="shown")
    t.columns = [f"{b:g} GiB" for b in t.columns]
    order = list(dict.fromkeys(df["contender"]))
    return t.loc[order].reset_index()


def merge(frames):
    """Runs with different caps or starts (an extension of a capped search): per contender and budget the
    longest length found wins (a longer fit is a fit; a capped row is only a lower bound)."""
    import pandas as pd

    df = pd.concat(frames, ignore_index=True)
    order = {v: i for i, v in enumerate(dict.fromkeys(df["variant"]))}
    df = df.sort_values("longest_seq_len", ascending=False, kind="stable").drop_duplicates(["variant", "budget_GiB"])
    df = df.sort_values(
        ["budget_GiB", "variant"], key=lambda s: s.map(order) if s.name == "variant" else s
    ).reset_index(drop=True)
    for b, grp in df.groupby("budget_GiB"):
        base = grp[grp["variant"] == "hf"]
        if len(base) and base["longest_seq_len"].iloc[0]:
            df.loc[grp.index, "x_hf"] = grp["longest_seq_len"] / base["longest_seq_len"].iloc[0]
    return df


def plot(df, path: Path, max_len: int) -> Path:
    plt = C.pyplot()
    import seaborn as sns

    budgets = sorted(df["budget_GiB"].unique())
    variants = list(dict.fromkeys(df["variant"]))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    colors = sns.color_palette("deep", len(variants))
    width = 0.8 / len(variants)
    for i, (v, c) in enumerate(zip(variants, colors)):
        sub = df[df["variant"] == v].set_index("budget_GiB").loc[budgets]
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(budgets))]
        bars = ax.bar(
            xs,
            sub["longest_seq_len"],
            width,
            color=c,
            label=C.label(v),
            hatch=["//" if cap else "" for cap in sub["capped"]],
            edgecolor="white",
        )
        for x, r in zip(xs, sub.itertuples()):
            ax.text(
                x,
                max(r.longest_seq_len, 1),
                f"{r.longest_seq_len}" + ("+" if r.capped else ""),
                ha="center",
                va="bottom",
                fontsize=6.5,
                rotation=90,
            )
        del bars
    ax.set_yscale("log", base=2)
    top = int(df["longest_seq_len"].max())
    ax.set_ylim(256, top * 4)
    ticks = [2**k for k in range(8, top.bit_length() + 2)]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t // 1024}k" if t >= 1024 else str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xticks(range(len(budgets)))
    ax.set_xticklabels([f"budget {b:g} GiB" for b in budgets])
    ax.set_ylabel("longest seq_len that fits (tokens, log2)")
    step = df["step"].iloc[0]
    caps = " or ".join(str(int(c)) for c in sorted(df.loc[df["capped"], "max_len"].fillna(max_len).unique())) or str(
        max_len
    )
    note = (
        f"\n(hatched, +: still fits at the search cap, {caps} tokens)"
        if df["capped"].any()
        else "\n(tokens; powers of two, then bisection to 256)"
    )
    ax.set_title(f"gpt2-small, batch 1, fp32, {step}: longest context under a tracked-memory budget{note}", fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    return C.save_fig(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[2, 4, 8], help="GiB (2^30 bytes)")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=C.HF_VARIANTS + C.TXLAB_PRESETS)
    ap.add_argument("--max-len", type=int, default=131072, help="search cap (tokens)")
    ap.add_argument("--step", type=int, default=256, help="bisection resolution (tokens)")
    ap.add_argument("--start", type=int, default=256, help="first length tried (a power of two times --step)")
    ap.add_argument("--optimizer", action="store_true", help="two full train steps with AdamW instead of fwd+bwd")
    ap.add_argument("--out", default="results/benchmarks/longest_context", help="Parquet folder")
    ap.add_argument("--plot", default="docs/img/longest_context.png")
    ap.add_argument(
        "--from",
        dest="stored",
        nargs="+",
        help="merge stored longest_context parquet files (e.g. a run "
        "and its extension past the cap), reprint and redraw; run nothing (--max-len: the cap of files without one)",
    )
    args = ap.parse_args(argv)

    if args.stored:
        import pandas as pd

        frames = [pd.read_parquet(p) for p in args.stored]
        for f in frames:
            if "max_len" not in f:
                f["max_len"] = args.max_len
        df = merge(frames)
        print(
            f"longest seq_len (tokens) whose {df['step'].iloc[0]} fits the budget; gpt2-small, batch 1, fp32, tracked peak:"
        )
        C.print_table(wide(df))
        C.print_table(df[[c for c in ("contender", "budget_GiB", "shown", "peak_at_longest_GiB", "x_hf") if c in df]])
        print(f"wrote {plot(df, Path(args.plot), args.max_len)}")
        return 0
    print(C.machine_line())
    df = run(args.budgets, args.variants, args.max_len, args.optimizer, start=args.start, step=args.step)
    print(
        f"longest seq_len (tokens) whose {df['step'].iloc[0]} fits the budget; gpt2-small, batch 1, fp32, tracked peak:"
    )
    C.print_table(wide(df))
    C.print_table(df[[c for c in ("contender", "budget_GiB", "shown", "peak_at_longest_GiB", "x_hf") if c in df]])
    runs = df.dropna(subset=["search_runs"])
    print(
        "search: " + ", ".join(f"{r.contender} {int(r.search_runs)} runs {r.search_s:.0f} s" for r in runs.itertuples())
    )
    print(C.machine_line())
    path = C.write_parquet(df, Path(args.out), "longest_context" + ("_adamw" if args.optimizer else ""))
    png = plot(df, Path(args.plot), args.max_len)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
