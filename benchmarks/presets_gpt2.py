"""Memory policies side by side at GPT-2 small: peak memory, its breakdown, step time.

    python benchmarks/presets_gpt2.py                       # 2048 (all presets) and 4096 (all but naive)
    python benchmarks/presets_gpt2.py --lengths 1024 --presets sdpa checkpoint --steps 3

Each trial is one `txlab.trial.run_trial` in this process (the same code as `txlab run`). Rows go to a
txlab store (default results/bench_presets_gpt2); trials already stored are not rerun, so an
interrupted run resumes. Prints a table, writes the table as Parquet and a plot beside the store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from txlab.config import load_config
from txlab.results.store import Store
from txlab.trial import run_trial
from txlab.units import GiB as GIB

PRESETS = ["naive", "sdpa", "checkpoint", "selective", "recompute"]


def configs(lengths, presets, steps, size, skip_naive_above):
    for T in lengths:
        for p in presets:
            if p == "naive" and T > skip_naive_above:
                continue
            yield load_config(
                None,
                {
                    "model.size": size,
                    "workload.seq_len": T,
                    "workload.batch_size": 1,
                    "policy.name": p,  # its chunk sizes (512 tiles, 1024-token loss chunks) clamped to T
                    "workload.steps": steps,
                    "workload.warmup_steps": 0,
                    "measure.device": "auto",
                },
            )


def table(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "seq_len": df["workload.seq_len"],
            "policy": df["policy.name"],
            "status": df["status"],
            "peak_GiB": df["peak_bytes"] / GIB,
            "activations_GiB": df["activations_bytes"] / GIB,
            "other_GiB": df["other_bytes"] / GIB,
            "params+grads+opt_GiB": (df["params_bytes"] + df["grads_bytes"] + df["optimizer_bytes"]) / GIB,
            "rss_GiB": df["peak_rss_bytes"] / GIB,
            "step_s": df["step_time_s"],
        }
    )
    order = {p: i for i, p in enumerate(PRESETS)}
    out = out.sort_values(["seq_len", "policy"], key=lambda s: s.map(order) if s.name == "policy" else s)
    # ratios side by side within one length: memory and time against sdpa
    for T, grp in out.groupby("seq_len"):
        base = grp[grp["policy"] == "sdpa"]
        if len(base):
            out.loc[grp.index, "peak_vs_sdpa"] = grp["peak_GiB"] / base["peak_GiB"].iloc[0]
            out.loc[grp.index, "time_vs_sdpa"] = grp["step_s"] / base["step_s"].iloc[0]
    return out.reset_index(drop=True)


def plot(tab: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    lengths = sorted(tab["seq_len"].unique())
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False, sharey=True)
    parts = [
        ("params+grads+opt_GiB", "params + grads + optimizer"),
        ("activations_GiB", "activations"),
        ("other_GiB", "other"),
    ]
    colors = sns.color_palette("deep", 3)
    for ax, T in zip(axes[0], lengths):
        sub = tab[tab["seq_len"] == T]
        bottom = pd.Series(0.0, index=sub.index)
        for (col, label), c in zip(parts, colors):
            ax.bar(sub["policy"], sub[col], bottom=bottom, label=label, color=c)
            bottom += sub[col]
        for x, (_, r) in enumerate(sub.iterrows()):
            ax.text(
                x,
                r["peak_GiB"],
                f"{r['peak_GiB']:.2f} GiB\n{r['step_s']:.1f} s/step",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(f"seq_len {T}")
        ax.set_xlabel("policy preset")
        ax.set_ylim(0, tab["peak_GiB"].max() * 1.25)
    axes[0][0].set_ylabel("peak memory at the peak, GiB (2^30 B)")
    axes[0][-1].legend(loc="upper right", fontsize=8)
    fig.suptitle("gpt2-small, batch 1, fp32, AdamW: peak memory breakdown per preset (CPU tracker)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--presets", nargs="+", default=["naive", "sdpa", "checkpoint", "recompute"], choices=PRESETS)
    ap.add_argument("--size", default="gpt2-small")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per trial (after the two memory steps)")
    ap.add_argument("--naive-max-len", type=int, default=2048, help="skip naive above this length (T x T memory)")
    ap.add_argument("--store", default="results/bench_presets_gpt2")
    args = ap.parse_args(argv)

    store = Store.open(args.store, create=True)
    done = store.final_keys()
    for cfg in configs(args.lengths, args.presets, args.steps, args.size, args.naive_max_len):
        if cfg.trial_key in done:
            continue
        print(f"running {cfg.policy.name} at seq_len {cfg.workload.seq_len} ...", file=sys.stderr, flush=True)
        store.write_row(run_trial(cfg, progress=True))
    keys = {c.trial_key for c in configs(args.lengths, args.presets, args.steps, args.size, args.naive_max_len)}
    df = store.read_pandas()
    tab = table(df[df["trial_key"].isin(keys)])
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(tab.to_string(index=False))
    out = Path(args.store)
    tab.to_parquet(out.parent / f"{out.name}_table.parquet")
    plot(tab, out.parent / f"{out.name}.png")
    print(f"wrote {out.parent / f'{out.name}_table.parquet'} and {out.parent / f'{out.name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
