"""txlab presets against Hugging Face GPT-2 (what a user would pick instead): peak memory of one forward +
backward and its time, gpt2-small shapes, batch 1, fp32, no optimizer.

    python benchmarks/vs_hf_gpt2.py                                # memory 1k..8k (fake tensors), time at 1024
    python benchmarks/vs_hf_gpt2.py --lengths 1024 2048 --reps 3   # time at 2048 too (~4x longer)
    python benchmarks/vs_hf_gpt2.py --lengths 1024 2048 4096 --ram-cap-gib 10

Contenders: `GPT2LMHeadModel` from the installed transformers (built from a GPT2Config of gpt2-small shape,
random weights, dropout 0, use_cache off, train mode), with its default attention and with
`gradient_checkpointing_enable()`, and txlab's `sdpa`, `checkpoint`, `selective`, `recompute` presets
(`--variants` adds `hf-eager`, `naive`). Everyone gets the same (1, T) tokens; HF computes its loss from
`labels=input_ids` as users write it.

Memory: txlab's MemoryMonitor (torch's MemTracker) on both models. Every length is measured on fake tensors
(exact byte accounting of every storage, no arithmetic, so 8192 costs seconds); the timed lengths are also
measured on real tensors (the first, untimed step), and the two columns must agree. Time: the step without
the tracker, contenders interleaved per repetition (rotating order), median of `--reps` after the tracked
step as warm-up; the spread is (max - min) / median. A contender whose fake peak is over `--ram-cap-gib` is
not run for real (the machine is shared).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DEFAULT_VARIANTS = ["hf", "hf-gc", "sdpa", "checkpoint", "selective", "recompute"]


def run(
    lengths,
    memory_lengths,
    variants,
    reps: int,
    ram_cap_gib: float,
    size: str = "gpt2-small",
    overrides: dict | None = None,
    log: bool = True,
):
    """The table as a DataFrame: one row per (variant, seq_len)."""
    import pandas as pd
    import torch

    rows = {}
    for T in sorted(set(memory_lengths) | set(lengths)):
        for v in variants:
            r = C.measure_memory(v, T, fake=True, size=size, overrides=overrides)
            rows[(v, T)] = {
                "variant": v,
                "seq_len": T,
                "note": r["note"],
                "n_params": r["n_params"],
                "peak_GiB": r["peak_bytes"] / C.GiB,
                "activations_GiB": r["activations_bytes"] / C.GiB,
                "other_GiB": r["other_bytes"] / C.GiB,
                "real_peak_GiB": None,
                "loss": None,
                **C.spread([]),
            }
            if log:
                print(
                    f"fake  {C.label(v):<18} T={T:<6} peak {r['peak_bytes'] / C.GiB:.3f} GiB",
                    file=sys.stderr,
                    flush=True,
                )
    for T in sorted(lengths):
        runnable = [v for v in variants if rows[(v, T)]["peak_GiB"] <= ram_cap_gib]
        for v in variants:
            if v not in runnable:
                rows[(v, T)]["status_real"] = f"not run: fake peak > {ram_cap_gib} GiB RAM cap"
        contenders = {v: C.build(v, T, size, overrides=overrides) for v in runnable}
        x, y = C.tokens(C.vocab_of(next(iter(contenders.values()))), T) if contenders else (None, None)
        for v, c in contenders.items():  # the tracked step, real tensors; also the warm-up
            r = C.tracked_steps(c, None, [(x, y)])
            rows[(v, T)].update(real_peak_GiB=r["peak_bytes"] / C.GiB, loss=r["loss"], status_real=r["status"])
            if log:
                print(
                    f"real  {C.label(v):<18} T={T:<6} peak {r['peak_bytes'] / C.GiB:.3f} GiB  loss {r['loss']:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
        steps = {v: C.make_step(c, None) for v, c in contenders.items()}
        times = C.interleaved({v: (lambda s=s: s(x, y)) for v, s in steps.items()}, reps, warmup=0, log=log)
        for v, ts in times.items():
            rows[(v, T)].update(C.spread(ts))
        del contenders, steps
        torch.manual_seed(0)
    return ratios(pd.DataFrame(rows.values()))


def ratios(df):
    """Peak and median time of each contender over HF default's at the same length."""
    df = df.drop(columns=[c for c in ("contender", "peak_vs_hf", "time_vs_hf") if c in df]).reset_index(drop=True)
    for T, grp in df.groupby("seq_len"):
        base = grp[grp["variant"] == "hf"]
        if len(base):
            df.loc[grp.index, "peak_vs_hf"] = grp["peak_GiB"] / base["peak_GiB"].iloc[0]
            if base["time_s"].notna().iloc[0]:
                df.loc[grp.index, "time_vs_hf"] = grp["time_s"] / base["time_s"].iloc[0]
    df.insert(1, "contender", df["variant"].map(C.label))
    return df


def show(df) -> None:
    cols = [
        "seq_len",
        "contender",
        "peak_GiB",
        "real_peak_GiB",
        "activations_GiB",
        "peak_vs_hf",
        "time_s",
        "time_min_s",
        "time_max_s",
        "spread",
        "reps",
        "time_vs_hf",
        "loss",
    ]
    C.print_table(df[[c for c in cols if c in df]])
    print(f"(gpt2 vocabulary: ln(50257) = {math.log(50257):.3f} is the loss of a uniform guess)")
    for v, note in df.groupby("variant")["note"].first().items():
        print(f"  {C.label(v)}: {note}")


def plot(df, path: Path) -> Path:
    plt = C.pyplot()
    import seaborn as sns

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    variants = list(dict.fromkeys(df["variant"]))
    colors = dict(zip(variants, sns.color_palette("deep", len(variants))))
    for v in variants:
        sub = df[df["variant"] == v].sort_values("seq_len")
        hf = v.startswith("hf")  # dashed, hollow markers, drawn on top (HF + grad ckpt coincides with txlab checkpoint)
        ax1.plot(
            sub["seq_len"],
            sub["peak_GiB"],
            "--" if hf else "-",
            marker="o",
            color=colors[v],
            label=C.label(v),
            markerfacecolor="white" if hf else colors[v],
            markersize=8 if hf else 5,
            zorder=3 if hf else 2,
        )
    C.log2_axis(ax1, df["seq_len"])
    ax1.set_yscale("log")
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax1.yaxis.set_major_locator(FixedLocator([1, 2, 4, 8, 16]))
    ax1.yaxis.set_major_formatter(ScalarFormatter())
    ax1.yaxis.set_minor_locator(NullLocator())
    wide = df.pivot(index="seq_len", columns="variant", values="peak_GiB")
    if {"hf-gc", "checkpoint"} <= set(wide) and (wide["hf-gc"] == wide["checkpoint"]).all():
        ax1.text(
            0.98,
            0.03,
            "HF + grad ckpt and txlab checkpoint: equal peaks",
            transform=ax1.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="grey",
        )
    ax1.set_xlabel("sequence length (tokens)")
    ax1.set_ylabel("peak tracked memory, GiB (2^30 B), log scale")
    ax1.set_title("peak memory of one forward + backward")
    ax1.legend(fontsize=8, loc="upper left")
    timed = df[df["time_s"].notna()]
    lengths = sorted(timed["seq_len"].unique())
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        for j, T in enumerate(lengths):
            r = timed[(timed["variant"] == v) & (timed["seq_len"] == T)]
            if not len(r):
                continue
            r = r.iloc[0]
            base = timed[(timed["variant"] == "hf") & (timed["seq_len"] == T)]["time_s"]
            b = base.iloc[0] if len(base) else r["time_s"]
            xpos = j + (i - (len(variants) - 1) / 2) * width
            ax2.bar(xpos, r["time_s"] / b, width, color=colors[v], label=C.label(v) if j == 0 else None)
            ax2.errorbar(
                xpos,
                r["time_s"] / b,
                yerr=[[(r["time_s"] - r["time_min_s"]) / b], [(r["time_max_s"] - r["time_s"]) / b]],
                color="black",
                lw=1,
                capsize=2,
            )
    ax2.axhline(1.0, color="grey", lw=1, ls=":")
    ax2.set_xticks(range(len(lengths)))
    ax2.set_xticklabels([f"seq_len {T}" for T in lengths])
    ax2.set_ylabel("step time / HF default's median")
    ax2.set_title("forward + backward time (median, whiskers min..max;\n2 shared CPU cores)", fontsize=10)
    ax2.set_ylim(0, ax2.get_ylim()[1] * 1.3)
    ax2.legend(fontsize=7, ncol=3, loc="upper center")
    fig.suptitle("gpt2-small, batch 1, fp32: txlab presets vs Hugging Face GPT2LMHeadModel", fontsize=11)
    return C.save_fig(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024], help="timed (and real-memory) lengths")
    ap.add_argument(
        "--memory-lengths",
        type=int,
        nargs="*",
        default=[1024, 2048, 4096, 8192],
        help="lengths measured on fake tensors (memory only)",
    )
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=C.HF_VARIANTS + C.TXLAB_PRESETS)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per contender (after one warm-up)")
    ap.add_argument("--size", default="gpt2-small", help="model size (debug for a smoke run)")
    ap.add_argument("--ram-cap-gib", type=float, default=8.0, help="skip real runs whose fake peak is above this")
    ap.add_argument("--out", default="results/benchmarks/vs_hf_gpt2", help="Parquet folder")
    ap.add_argument("--plot", default="docs/img/vs_hf_gpt2.png")
    ap.add_argument(
        "--from",
        dest="stored",
        nargs="+",
        help="merge stored vs_hf_gpt2.parquet files (timed rows win), reprint and redraw; run nothing",
    )
    args = ap.parse_args(argv)

    if args.stored:
        import pandas as pd

        df = pd.concat([pd.read_parquet(p) for p in args.stored], ignore_index=True)
        df = df.sort_values("reps", ascending=False, kind="stable").drop_duplicates(["variant", "seq_len"])
        order = {v: i for i, v in enumerate(dict.fromkeys(df.sort_index()["variant"]))}
        df = ratios(df.sort_values(["seq_len", "variant"], key=lambda s: s.map(order) if s.name == "variant" else s))
        show(df)
        print(f"wrote {plot(df, Path(args.plot))}")
        return 0
    print(C.machine_line())
    df = run(args.lengths, args.memory_lengths, args.variants, args.reps, args.ram_cap_gib, args.size)
    for k, v in C.machine().items():
        df[f"machine_{k}"] = v
    show(df)
    print(C.machine_line())
    path = C.write_parquet(df, Path(args.out), "vs_hf_gpt2")
    png = plot(df, Path(args.plot))
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
