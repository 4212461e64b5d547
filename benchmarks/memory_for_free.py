"""Memory for free (issue 17): txlab's presets against Hugging Face GPT-2 default and with gradient
checkpointing, at long contexts, time and memory side by side, with the ratios to HF + checkpointing.

    python benchmarks/memory_for_free.py                                  # 4096 and 8192 tokens, 3 reps
    python benchmarks/memory_for_free.py --lengths 4096 --reps 5 --variants hf hf-gc recompute recompute-0.2
    python benchmarks/memory_for_free.py --from results/benchmarks/memory_for_free/memory_for_free.parquet

One forward + backward of gpt2-small (batch 1, fp32, no optimizer), the same (1, T) tokens for everyone,
as in benchmarks/vs_hf_gpt2.py. Contenders: `hf` (GPT2LMHeadModel, its default attention), `hf-gc` (the
same with gradient_checkpointing_enable()), txlab's `sdpa`, `checkpoint`, `selective`, `recompute`
presets, `recompute-chunked`: the `recompute` preset with `policy.attention: chunked` (what the preset was
until 0.2, with this release's kernels), and `recompute-0.2`: the same with the kernels of txlab 0.2 (the
chunked attention's PyTorch-ops tile body and the chunked loss that recomputes each chunk's logits under
checkpointing), so the gain of this issue's kernels and preset shows in the same run. `--variants` also
takes `selective-matmuls` and `selective-torchtitan`: the selective preset saving only the matmul outputs
(torch's documented op-level example) or as torchtitan's op-level policy does (every second matmul
recomputed), beside txlab's own save list.

Memory: the tracked peak (txlab's MemoryMonitor) of every contender at every length on fake tensors, and on
real tensors in the first (untimed, warm-up) step of each timed contender; contenders whose fake peak is
over --ram-cap-gib are not run for real (the machine is shared). Time: the step without the tracker,
contenders interleaved per repetition with the order rotating, median of --reps; spread = (max-min)/median.
The load average is printed at the start and the end and stored with every row.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DEFAULT_VARIANTS = ["hf", "hf-gc", "sdpa", "checkpoint", "selective", "recompute", "recompute-chunked", "recompute-0.2"]
# variants of the recompute preset: its blocks with chunked attention (this release's fused CPU tiles), and
# with txlab 0.2's kernels (the chunked attention's PyTorch-ops tiles, the loss recomputing each chunk)
CHUNKED = {"recompute-chunked", "recompute-0.2"}
# the selective preset saving what other op-level policies save (txlab.policy.remat.SELECTIVE_POLICIES)
SAVES = {"selective-matmuls": "matmuls", "selective-torchtitan": "torchtitan"}
LABELS = {
    "recompute-chunked": "txlab recompute, chunked attn",
    "recompute-0.2": "txlab recompute (0.2 kernels)",
    "selective-matmuls": "selective, save matmuls only",
    "selective-torchtitan": "selective, torchtitan op-SAC",
}


def label(v: str) -> str:
    return LABELS.get(v, C.label(v))


def old_chunked_loss(hidden, weight, targets, chunk: int):
    """txlab 0.2's chunked loss: each chunk's logits recomputed in backward under checkpointing."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from txlab.policy.loss import _chunk_ce_sum

    h, t = hidden.flatten(0, 1), targets.flatten()
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + checkpoint(_chunk_ce_sum, h[s : s + chunk], weight, t[s : s + chunk], use_reentrant=False)
    return total / h.shape[0]


def build(v: str, T: int, size: str):
    """A contender; the chunked variants run the recompute preset with `policy.attention: chunked` (0.2's
    recompute), `recompute-0.2` also with 0.2's kernels."""
    if v in SAVES:
        c = C.build("selective", T, size, overrides={"policy.selective_save": SAVES[v]})
        return C.Contender(v, c.model, c.loss, c.note + f"; policy.selective_save {SAVES[v]}")
    if v not in CHUNKED:
        return C.build(v, T, size)
    import functools

    from txlab.model.attention import chunked_attention
    from txlab.model.gpt import Attention

    c = C.build("recompute", T, size, overrides={"policy.attention": "chunked"})
    if v == "recompute-chunked":
        return C.Contender(v, c.model, c.loss, c.note)
    model, chunk = c.model, min(1024, T)
    for m in model.modules():  # the same tiles, bound to the ops body (forward and recomputation alike)
        if isinstance(m, Attention):
            m.attn_fn = functools.partial(chunked_attention, **m.attn_fn.keywords, body="ops")

    def loss(x, y):
        return old_chunked_loss(model(x), model.lm_head.weight, y, chunk)

    return C.Contender(v, model, loss, c.note + "; 0.2 kernels: ops tile body, loss recomputed per chunk")


def fake_peak(v: str, T: int, size: str) -> dict:
    with C.fake_mode(hf=v.startswith("hf")):
        c = build(v, T, size)
        row = C.tracked_steps(c, None, [C.tokens(C.vocab_of(c), T)])
        row["note"] = c.note
    return row


def run(lengths, variants, reps: int, ram_cap_gib: float, size: str = "gpt2-small", log: bool = True):
    import pandas as pd
    import torch

    rows = []
    for T in lengths:
        fake = {}
        for v in variants:
            fake[v] = fake_peak(v, T, size)
            if log:
                print(f"fake  {label(v):<30} T={T:<6} {fake[v]['peak_bytes'] / C.GiB:.3f} GiB", file=sys.stderr)
        runnable = [v for v in variants if fake[v]["peak_bytes"] / C.GiB <= ram_cap_gib]
        contenders = {v: build(v, T, size) for v in runnable}
        x, y = C.tokens(C.vocab_of(next(iter(contenders.values()))), T) if contenders else (None, None)
        real = {}
        for v, c in contenders.items():  # the tracked step on real tensors, also the warm-up
            real[v] = C.tracked_steps(c, None, [(x, y)])
            if log:
                print(f"real  {label(v):<30} T={T:<6} {real[v]['peak_bytes'] / C.GiB:.3f} GiB", file=sys.stderr)
        steps = {v: C.make_step(c, None) for v, c in contenders.items()}
        times = C.interleaved({v: (lambda s=s: s(x, y)) for v, s in steps.items()}, reps, warmup=0, log=log)
        machine = C.machine()
        for v in variants:
            f, r = fake[v], real.get(v)
            rows.append(
                {
                    "seq_len": T,
                    "variant": v,
                    "contender": label(v),
                    "note": f["note"],
                    "peak_GiB": f["peak_bytes"] / C.GiB,
                    "activations_GiB": f["activations_bytes"] / C.GiB,
                    "real_peak_GiB": None if r is None else r["peak_bytes"] / C.GiB,
                    "loss": None if r is None else r["loss"],
                    "run": "timed" if r is not None else f"not run: fake peak > {ram_cap_gib:g} GiB RAM cap",
                    **C.spread(times.get(v, [])),
                    **{f"machine_{k}": val for k, val in machine.items()},
                }
            )
        del contenders, steps
        torch.manual_seed(0)
    return ratios(pd.DataFrame(rows))


BASES = {"hf": "hf", "hf-gc": "hf_gc", "sdpa": "sdpa"}  # variant -> column suffix of the ratios to it


def ratios(df):
    """Peak and median time over HF default's, HF + gradient checkpointing's and txlab sdpa's, per length
    (each where that contender ran), and activations over sdpa's (what `selective` saves)."""
    df = df.reset_index(drop=True)
    for T, grp in df.groupby("seq_len"):
        for base, suffix in BASES.items():
            b = grp[grp["variant"] == base]
            if not len(b):
                continue
            df.loc[grp.index, f"peak_vs_{suffix}"] = grp["peak_GiB"] / b["peak_GiB"].iloc[0]
            if base == "sdpa":
                df.loc[grp.index, "activations_vs_sdpa"] = grp["activations_GiB"] / b["activations_GiB"].iloc[0]
            if b["time_s"].notna().iloc[0]:
                df.loc[grp.index, f"time_vs_{suffix}"] = grp["time_s"] / b["time_s"].iloc[0]
    return df


def baseline(df) -> str:
    """The contender the plot divides by: HF + checkpointing when it ran, else the first contender."""
    variants = list(dict.fromkeys(df["variant"]))
    return "hf-gc" if "hf-gc" in variants else variants[0]


COLUMNS = [
    "seq_len",
    "contender",
    "peak_GiB",
    "real_peak_GiB",
    "activations_GiB",
    "peak_vs_hf",
    "peak_vs_hf_gc",
    "time_s",
    "time_min_s",
    "time_max_s",
    "spread",
    "reps",
    "time_vs_hf",
    "time_vs_hf_gc",
    "activations_vs_sdpa",
    "time_vs_sdpa",
    "loss",
]


def show(df) -> None:
    C.print_table(df[[c for c in COLUMNS if c in df]])
    print(f"(gpt2 vocabulary: ln(50257) = {math.log(50257):.3f} is the loss of a uniform guess)")
    for v, note in df.groupby("variant", sort=False)["note"].first().items():
        print(f"  {label(v)}: {note}")
    for T, grp in df.groupby("seq_len"):
        loads = grp[["machine_load_1m", "machine_load_5m"]].iloc[0]
        print(f"  seq_len {T}: load {loads['machine_load_1m']} (1 min) {loads['machine_load_5m']} (5 min) at its end")
    if "time_vs_hf_gc" in df:
        for r in df[(df["variant"] == "recompute") & df["time_vs_hf_gc"].notna()].itertuples():
            held = r.time_vs_hf_gc <= 1.0 and r.peak_vs_hf_gc <= 0.5
            print(
                f"goal at {r.seq_len}: recompute time {r.time_vs_hf_gc:.3f}x HF + grad ckpt (<= 1.0), peak "
                f"{r.peak_vs_hf_gc:.3f}x (<= 0.5): {'holds' if held else 'does not hold'}"
            )
    if "time_vs_sdpa" in df:
        for r in df[df["variant"].str.startswith("selective") & df["time_vs_sdpa"].notna()].itertuples():
            held = r.time_vs_sdpa <= 1.10 and r.activations_vs_sdpa < 1.0
            print(
                f"goal at {r.seq_len}: {label(r.variant)} time {r.time_vs_sdpa:.3f}x sdpa (<= 1.10), activations "
                f"{r.activations_vs_sdpa:.3f}x sdpa's (< 1): {'holds' if held else 'does not hold'}"
            )


def plot(df, path: Path) -> Path:
    plt = C.pyplot()
    import seaborn as sns

    lengths = sorted(df["seq_len"].unique())
    variants = list(dict.fromkeys(df["variant"]))
    base = baseline(df)
    peak_col, time_col = f"peak_vs_{BASES[base]}", f"time_vs_{BASES[base]}"
    colors = dict(zip(variants, sns.color_palette("deep", len(variants))))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(variants))
    for ax, col, title in (
        (axes[0], peak_col, f"peak tracked memory / {label(base)}'s"),
        (axes[1], time_col, f"step time (median) / {label(base)}'s"),
    ):
        for i, v in enumerate(variants):
            for j, T in enumerate(lengths):
                r = df[(df["variant"] == v) & (df["seq_len"] == T)]
                xpos = j + (i - (len(variants) - 1) / 2) * width
                if not len(r) or r[col].isna().all():
                    if len(r) and col == time_col:  # say why a bar is missing
                        ax.text(xpos, 0.03, "not run: RAM cap", rotation=90, fontsize=6.5, ha="center", va="bottom")
                    continue
                r = r.iloc[0]
                ax.bar(xpos, r[col], width, color=colors[v], label=label(v) if j == 0 else None)
                if col == time_col:
                    b = df[(df["variant"] == base) & (df["seq_len"] == T)]["time_s"].iloc[0]
                    ax.errorbar(
                        xpos,
                        r[col],
                        yerr=[[(r["time_s"] - r["time_min_s"]) / b], [(r["time_max_s"] - r["time_s"]) / b]],
                        color="black",
                        lw=1,
                        capsize=2,
                    )
        ax.axhline(1.0, color="grey", lw=1, ls=":")
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([f"seq_len {T}" for T in lengths])
        ax.set_title(title, fontsize=10)
    if base == "hf-gc":  # the goal: at most half HF + checkpointing's peak
        axes[0].axhline(0.5, color="red", lw=0.8, ls="--")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4, frameon=False)
    load = df["machine_load_1m"].max()
    fig.suptitle(
        f"gpt2-small, batch 1, fp32, fwd+bwd: txlab presets vs {'HF GPT-2' if base.startswith('hf') else label(base)} "
        f"(2 CPU cores, load up to {load:g})",
        fontsize=10,
    )
    return C.save_fig(fig, path, rect=(0, 0.11, 1, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=DEFAULT_VARIANTS + ["naive", *SAVES])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", default="gpt2-small")
    ap.add_argument("--ram-cap-gib", type=float, default=7.0, help="run for real only contenders under this")
    ap.add_argument("--out", default="results/benchmarks/memory_for_free")
    ap.add_argument("--plot", default="docs/img/memory_for_free.png")
    ap.add_argument("--from", dest="stored", nargs="+", help="reprint and redraw stored Parquet files; run nothing")
    args = ap.parse_args(argv)
    if args.stored:
        import pandas as pd

        df = ratios(pd.concat([pd.read_parquet(p) for p in args.stored], ignore_index=True))
        show(df)
        print(f"wrote {plot(df, Path(args.plot))}")
        return 0
    print(C.machine_line(), flush=True)
    df = run(args.lengths, args.variants, args.reps, args.ram_cap_gib, args.size)
    print(C.machine_line())
    print(f"wrote {C.write_parquet(df, Path(args.out), 'memory_for_free')}", flush=True)  # before anything can fail
    show(df)
    print(f"wrote {plot(df, Path(args.plot))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
