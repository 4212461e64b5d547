"""txlab presets against Hugging Face GPT-2 or Llama (what a user would pick instead): peak memory of one
training step and its time, batch 1, fp32.

    python benchmarks/vs_hf_gpt2.py                                # memory 1k..8k (fake tensors), time at 1024
    python benchmarks/vs_hf_gpt2.py --lengths 1024 2048 --reps 3   # time at 2048 too (~4x longer)
    python benchmarks/vs_hf_gpt2.py --lengths 1024 2048 4096 --ram-cap-gib 10
    python benchmarks/vs_hf_gpt2.py --family llama                 # Llama 3.2 1B shape, 2 layers, + AdamW

`--family gpt2` (the default): gpt2-small shapes, one forward + backward, no optimizer (`--optimizer` adds
AdamW). `--family llama`: `LlamaForCausalLM` of Llama 3.2 1B's shape (2048 wide, 32 heads, 8 KV heads,
head_dim 64, MLP 8192, vocab 128256, tied embeddings, Llama 3.1 RoPE scaling factor 32) cut to `--layers`
layers (default 2), random weights, written as a local config.json (+ the weights, for the real runs);
txlab builds its model from that same file (`model.hf: DIR`) and loads those weights (`model.init:
pretrained`), so both sides run one architecture on one set of weights. Steps are forward + backward +
AdamW by default (txlab's AdamW for both sides, unfused, at learning rate 0: every op runs, the weights
stay put, `_common.benchmark_adamw`).

Contenders: `GPT2LMHeadModel` (or `LlamaForCausalLM`, attn_implementation sdpa) from the installed
transformers (built from a config of the shape, random weights, dropout 0, use_cache off, train mode),
with its default attention and with
`gradient_checkpointing_enable()`, and txlab's `sdpa`, `checkpoint`, `selective`, `recompute` presets
(`--variants` adds `hf-eager`, `naive`). Everyone gets the same (1, T) tokens; HF computes its loss from
`labels=input_ids` as users write it.

Memory: txlab's MemoryMonitor (torch's MemTracker) on both models. Every length is measured on fake tensors
(exact byte accounting of every storage, no arithmetic, so 8192 costs seconds); the timed lengths are also
measured on real tensors (the first, untimed step), and the two columns must agree. Time: the step without
the tracker, contenders interleaved per repetition (rotating order), median of `--reps` after the tracked
step as warm-up (with an optimizer: a warm-up round, in which the optimizers make their state); the spread
is (max - min) / median. For the timing HF default and HF + grad ckpt are one HF model (checkpointing
switched before each step) and the txlab presets share one set of parameters (`_common.build_shared`), so
the RAM held is two models and two optimizers, not one per contender; the tracked steps give each
contender a fresh optimizer. A contender whose fake peak is over `--ram-cap-gib` is not run for real (the
machine is shared).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

DEFAULT_VARIANTS = ["hf", "hf-gc", "sdpa", "checkpoint", "selective", "recompute"]
FAMILIES = {  # family -> (default size, default layers, optimizer by default, Hugging Face class)
    "gpt2": ("gpt2-small", None, False, "GPT2LMHeadModel"),
    "llama": ("llama-3.2-1b", 2, True, "LlamaForCausalLM"),
}


def run(
    lengths,
    memory_lengths,
    variants,
    reps: int,
    ram_cap_gib: float,
    size: str = "gpt2-small",
    overrides: dict | None = None,
    log: bool = True,
    family: str = "gpt2",
    optimizer: bool = False,
    real_memory: bool = True,
    low_ram: bool = False,
):
    """The table as a DataFrame: one row per (variant, seq_len). `real_memory`: the timed lengths' peaks
    measured on real tensors too (tracked steps, then also the warm-up). `low_ram`: one side's model held
    at a time (`_common.OneSideAtATime`; the tracked steps each on a contender of its own)."""
    overrides = dict(overrides or {})
    shape = size + (f", {overrides['model.n_layers']} layers" if "model.n_layers" in overrides else "")
    with tempfile.TemporaryDirectory(prefix="vs_hf_") as tmp:
        if family != "gpt2":  # both sides read one config.json; txlab loads the HF model's weights
            ckpt = C.write_hf_checkpoint(Path(tmp), size, overrides, family)
            overrides = {"model.hf": str(ckpt), "model.init": "pretrained"}
            if lengths:  # real runs: the weights the HF contender is built with (seed 0), saved for txlab
                C.build("hf", min(lengths), size, overrides=overrides).model.save_pretrained(ckpt)
        df = _measure(
            lengths, memory_lengths, variants, reps, ram_cap_gib, size, overrides, log, optimizer, real_memory, low_ram
        )
    df["family"], df["shape"], df["optimizer"] = family, shape, optimizer
    return ratios(df)


def _measure(
    lengths, memory_lengths, variants, reps, ram_cap_gib, size, overrides, log, optimizer, real_memory, low_ram
):
    import pandas as pd
    import torch

    rows = {}
    for T in sorted(set(memory_lengths) | set(lengths)):
        for v in variants:
            r = C.measure_memory(v, T, fake=True, size=size, overrides=overrides, optimizer=optimizer)
            rows[(v, T)] = {
                "variant": v,
                "seq_len": T,
                "note": r["note"],
                "n_params": r["n_params"],
                "vocab_size": r["vocab_size"],
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
        if not runnable:
            continue
        vocab = rows[(runnable[0], T)]["vocab_size"]
        batches = [C.tokens(vocab, T, seed=i) for i in range(2 if optimizer else 1)]
        x, y = batches[0]
        contenders = {} if low_ram else C.build_shared(runnable, T, size, overrides)
        for v in runnable if real_memory else ():  # tracked step(s), real tensors (also a warm-up)
            if low_ram:  # a contender of its own, alone in RAM
                r = C.measure_memory(v, T, fake=False, size=size, overrides=overrides, optimizer=optimizer)
            else:
                opt = C.benchmark_adamw(contenders[v].model) if optimizer else None  # fresh: state made here
                r = C.tracked_steps(contenders[v], opt, batches)
                del opt
            rows[(v, T)].update(real_peak_GiB=r["peak_bytes"] / C.GiB, loss=r["loss"], status_real=r["status"])
            if log:
                print(
                    f"real  {C.label(v):<18} T={T:<6} peak {r['peak_bytes'] / C.GiB:.3f} GiB  loss {r['loss']:.4f}",
                    file=sys.stderr,
                    flush=True,
                )
        load_before = C.machine()["load_1m"]
        losses = {}
        if low_ram:
            sides = C.OneSideAtATime(runnable, T, size, overrides, optimizer)
            steps = {v: (lambda v=v: sides.step(v, x, y)) for v in runnable}
            prepare = {v: (lambda v=v: sides.prepare(v)) for v in runnable}
        else:
            opts = C.optimizer_groups(contenders, C.benchmark_adamw) if optimizer else {}  # one per shared weights
            steps = {v: (lambda s=C.make_step(c, opts.get(v)): s(x, y)) for v, c in contenders.items()}
            prepare = {v: c.prepare for v, c in contenders.items()}
        times = C.interleaved(
            {v: (lambda s=s, v=v: losses.__setitem__(v, float(s()))) for v, s in steps.items()},
            reps,
            # an optimizer makes its state in the warm-up; one side at a time: every build is fresh
            warmup=1 if optimizer or not real_memory or low_ram else 0,
            log=log,
            prepare=prepare,
        )
        for v, ts in times.items():  # the 1-minute load before and after this length's timing
            rows[(v, T)].update(C.spread(ts), load_1m_before=load_before, load_1m_after=C.machine()["load_1m"])
            if rows[(v, T)]["loss"] is None:  # no tracked step: the loss of the last timed one
                rows[(v, T)]["loss"] = losses[v]
        del contenders, steps, prepare
        sides = opts = None  # noqa: F841 - dropped before the next length builds its own
        torch.manual_seed(0)
    return pd.DataFrame(rows.values())


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
    family = df["family"].iloc[0] if "family" in df else "gpt2"
    vocab = int(df["vocab_size"].iloc[0]) if "vocab_size" in df else 50257
    print(f"({family} vocabulary: ln({vocab}) = {math.log(vocab):.3f} is the loss of a uniform guess)")
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
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax1.yaxis.set_major_locator(FixedLocator([0.5, 1, 2, 4, 8, 16, 32, 64, 128]))
    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_locator(NullLocator())
    wide = df.pivot(index="seq_len", columns="variant", values="peak_GiB")
    gap = (wide["checkpoint"] / wide["hf-gc"] - 1).abs().max() if {"hf-gc", "checkpoint"} <= set(wide) else None
    xlabel = "sequence length (tokens)"
    if gap is not None and gap < 0.005:  # under the axis: the lines coincide, no place inside is free for every family
        xlabel += "\nHF + grad ckpt and txlab checkpoint: " + ("equal peaks" if gap == 0 else f"peaks within {gap:.2%}")
    ax1.set_xlabel(xlabel)
    ax1.set_ylabel("peak tracked memory, GiB (2^30 B), log scale")
    what = "forward + backward" + (" + AdamW" if "optimizer" in df and df["optimizer"].iloc[0] else "")
    ax1.set_title(f"peak memory of one {what}")
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
    loads = [df[c].max() for c in ("machine_load_1m_start", "machine_load_1m") if c in df]
    load = f", load up to {max(loads):g}" if loads else ""
    ax2.set_title(f"{what} time (median, whiskers min..max;\n2 CPU cores{load})", fontsize=10)
    ax2.set_ylim(0, ax2.get_ylim()[1] * 1.3)
    ax2.legend(fontsize=7, ncol=3, loc="upper center")
    family = df["family"].iloc[0] if "family" in df else "gpt2"
    shape = df["shape"].iloc[0] if "shape" in df else "gpt2-small"
    fig.suptitle(f"{shape}, batch 1, fp32: txlab presets vs Hugging Face {FAMILIES[family][3]}", fontsize=11)
    return C.save_fig(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=list(FAMILIES), default="gpt2", help="the Hugging Face architecture")
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
    ap.add_argument("--size", help="model size (debug for a smoke run); default gpt2-small / llama-3.2-1b")
    ap.add_argument("--layers", type=int, help="model.n_layers (default: the size's; llama: 2)")
    ap.add_argument(
        "--optimizer",
        action=argparse.BooleanOptionalAction,
        help="steps with AdamW (default: llama yes, gpt2 no: forward + backward)",
    )
    ap.add_argument(
        "--real-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the timed lengths' peaks on real tensors too (--no-real-memory: fake tensors only, a warm-up round)",
    )
    ap.add_argument(
        "--low-ram",
        action="store_true",
        help="hold one side's model (HF or txlab) at a time, rebuilt untimed when its turn comes",
    )
    ap.add_argument("--ram-cap-gib", type=float, default=8.0, help="skip real runs whose fake peak is above this")
    ap.add_argument("--out", help="Parquet folder (default results/benchmarks/vs_hf_FAMILY)")
    ap.add_argument("--plot", help="PNG (default docs/img/vs_hf_FAMILY.png)")
    ap.add_argument(
        "--from",
        dest="stored",
        nargs="+",
        help="merge stored vs_hf_gpt2.parquet files (timed rows win), reprint and redraw; run nothing",
    )
    args = ap.parse_args(argv)
    size, layers, optimizer, _ = FAMILIES[args.family]
    size, layers = args.size or size, args.layers or layers
    optimizer = optimizer if args.optimizer is None else args.optimizer
    out = Path(args.out or f"results/benchmarks/vs_hf_{args.family}")
    png = Path(args.plot or f"docs/img/vs_hf_{args.family}.png")
    name = f"vs_hf_{args.family}"

    if args.stored:
        import pandas as pd

        df = pd.concat([pd.read_parquet(p) for p in args.stored], ignore_index=True)
        df = df.sort_values("reps", ascending=False, kind="stable").drop_duplicates(["variant", "seq_len"])
        order = {v: i for i, v in enumerate(dict.fromkeys(df.sort_index()["variant"]))}
        df = ratios(df.sort_values(["seq_len", "variant"], key=lambda s: s.map(order) if s.name == "variant" else s))
        show(df)
        print(f"wrote {plot(df, png)}")
        return 0
    start = C.machine()
    print(C.machine_line())
    df = run(
        args.lengths,
        args.memory_lengths,
        args.variants,
        args.reps,
        args.ram_cap_gib,
        size,
        {"model.n_layers": layers} if layers else None,
        family=args.family,
        optimizer=optimizer,
        real_memory=args.real_memory,
        low_ram=args.low_ram,
    )
    for k, v in C.machine().items():  # at the end of the run; the start's load beside it
        df[f"machine_{k}"] = v
    df["machine_load_1m_start"], df["machine_utc_start"] = start["load_1m"], start["utc"]
    show(df)
    print(C.machine_line())
    path = C.write_parquet(df, out, name)
    print(f"wrote {path} and {plot(df, png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
