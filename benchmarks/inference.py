"""Long-context decoding at GPT-2 small under each KV policy, and the int4 projections.

    nice python benchmarks/inference.py                         # 1024, 2048, 4096; prefill + 16 tokens
    nice python benchmarks/inference.py --lengths 1024 --decode-tokens 8

Each trial is one `txlab.trial.run_trial` in this process (the same code as `txlab run`): a decode
workload (prefill `seq_len` tokens, then generate `--decode-tokens` one at a time) under `policy.kv`
cache (12 KV heads), grouped (the 4-KV-head variant of the model) and recompute (12 heads, K/V rebuilt
from kept layer inputs in k_chunk tiles). Then the int4 projections against full precision at the
shortest length, on the shipped corpus (`data.source: corpus`).

Rows go to a txlab store (default results/bench_inference); trials already stored are not rerun, so an
interrupted run resumes. Prints the tables (KV bytes against 2 * L * n_kv_heads * head_dim * T * bytes),
writes them as Parquet and a plot beside the store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from txlab.config import load_config
from txlab.model.decode import kv_cache_analytic_bytes
from txlab.model.quant import quantize_model
from txlab.results.store import Store
from txlab.trial import run_trial
from txlab.units import GiB as GIB

MIB = 2**20
KV_POLICIES = ("cache", "grouped", "recompute")


def base(size: str, T: int, decode_tokens: int, k_chunk: int, kv: str = "cache") -> dict:
    return {
        "model.size": size,
        "workload.kind": "decode",
        "workload.seq_len": T,
        "workload.decode_tokens": decode_tokens,
        "workload.batch_size": 1,
        "workload.steps": 1,
        "workload.warmup_steps": 0,
        "policy.name": "sdpa",
        "policy.kv": kv,
        "measure.device": "auto",
    } | ({"policy.k_chunk": min(k_chunk, T)} if kv == "recompute" else {})  # the tile only recompute reads


def kv_configs(args):
    for T in args.lengths:
        for kv in args.kv:
            extra = {"model.n_kv_heads": args.grouped_kv_heads} if kv == "grouped" else {}
            yield load_config(None, {**base(args.size, T, args.decode_tokens, args.k_chunk, kv), **extra})


def quant_configs(args):
    T = min(args.lengths)
    for quant in ("none", "int4"):
        yield load_config(
            None,
            {
                **base(args.size, T, args.decode_tokens, args.k_chunk),
                "data.source": "corpus",
                "model.quant": quant,
                "model.quant_group": args.quant_group,
            },
        )


def kv_table(df: pd.DataFrame) -> pd.DataFrame:
    head_dim = df["model.d_model"] // df["model.n_heads"]
    tokens = df["workload.seq_len"] + df["workload.decode_tokens"]
    elem = df["workload.dtype"].map({"fp32": 4, "bf16": 2})
    analytic = [
        kv_cache_analytic_bytes(L, h, d, t, e)
        for L, h, d, t, e in zip(df["model.n_layers"], df["model.n_kv_heads"], head_dim, tokens, elem)
    ]
    out = pd.DataFrame(
        {
            "seq_len": df["workload.seq_len"],
            "kv": df["policy.kv"],
            "kv_heads": df["model.n_kv_heads"],
            "status": df["status"],
            "peak_GiB": df["peak_bytes"] / GIB,
            "weights_GiB": df["params_bytes"] / GIB,
            "kv_cache_MiB": df["kv_cache_bytes"] / MIB,
            "analytic_MiB": pd.Series(analytic, index=df.index) / MIB,
            "kept_inputs_MiB": df["kv_inputs_bytes"] / MIB,
            "activations_MiB": df["activations_bytes"] / MIB,
            "other_MiB": df["other_bytes"] / MIB,
            "rss_GiB": df["peak_rss_bytes"] / GIB,
            "prefill_s": df["prefill_time_s"],
            "s_per_token": df["time_per_token_s"],
        }
    )
    out["kv_exact"] = [
        (bool(c == 0) if k == "recompute" else bool(c * MIB == a * MIB)) if pd.notna(c) else None
        for k, c, a in zip(out["kv"], out["kv_cache_MiB"], out["analytic_MiB"])
    ]
    order = {k: i for i, k in enumerate(KV_POLICIES)}
    out = out.sort_values(["seq_len", "kv"], key=lambda s: s.map(order) if s.name == "kv" else s)
    return out.reset_index(drop=True)


def quant_table(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "seq_len": df["workload.seq_len"],
            "quant": df["model.quant"],
            "group": df["model.quant_group"].where(df["model.quant"] == "int4"),
            "status": df["status"],
            "weights_fp_MiB": df["weight_bytes_fp"] / MIB,
            "weights_MiB": df["weight_bytes"] / MIB,
            "peak_GiB": df["peak_bytes"] / GIB,
            "prefill_s": df["prefill_time_s"],
            "s_per_token": df["time_per_token_s"],
            "logit_rel_error": df["logit_rel_error"],
            "next_token_agreement": df["next_token_agreement"],
        }
    )
    out["weights_saving"] = 1 - out["weights_MiB"] / out["weights_fp_MiB"]
    return out.sort_values("quant").reset_index(drop=True)


def plot(tab: pd.DataFrame, path: Path, title: str, turns: pd.DataFrame | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    lengths = sorted(tab["seq_len"].unique())
    kvs = [k for k in KV_POLICIES if k in set(tab["kv"])]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [1.5, 1]})
    parts = [
        ("weights_GiB", "weights", 1),
        ("kv_cache_MiB", "KV cache", 1 / 1024),
        ("kept_inputs_MiB", "kept layer inputs (recompute)", 1 / 1024),
        ("activations_MiB", "other activations", 1 / 1024),
        ("other_MiB", "other", 1 / 1024),
    ]
    colors = sns.color_palette("Set2", len(parts))
    width = 0.8 / len(kvs)
    for j, kv in enumerate(kvs):
        sub = tab[tab["kv"] == kv].set_index("seq_len").reindex(lengths)
        x = [i + (j - (len(kvs) - 1) / 2) * width for i in range(len(lengths))]
        bottom = pd.Series(0.0, index=sub.index)
        for (col, label, scale), c in zip(parts, colors):
            val = sub[col].fillna(0) * scale
            if col == "activations_MiB":  # activations include the kept inputs: draw them apart
                val = val - sub["kept_inputs_MiB"].fillna(0) * scale
            ax_m.bar(
                x,
                val,
                bottom=bottom,
                width=width * 0.92,
                color=c,
                label=label if j == 0 else None,
                edgecolor="white",
                linewidth=0.5,
            )
            bottom += val
        for xi, (T, r) in zip(x, sub.iterrows()):
            if pd.notna(r["peak_GiB"]):
                ax_m.text(xi, r["peak_GiB"], f"{kv}\n{r['peak_GiB']:.3f}", ha="center", va="bottom", fontsize=7.5)
    ax_m.set_xticks(range(len(lengths)), [str(t) for t in lengths])
    ax_m.set_xlabel("prompt length (tokens)")
    ax_m.set_ylabel("memory at the peak, GiB (2^30 B)")
    ax_m.set_ylim(0, tab["peak_GiB"].max() * 1.22)
    ax_m.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8, frameon=False)
    ax_m.set_title("peak memory and what it holds (bars: cache | grouped | recompute)", fontsize=10)
    pal = dict(zip(KV_POLICIES, sns.color_palette("colorblind", 3)))
    for kv in kvs:
        sub = tab[tab["kv"] == kv].sort_values("seq_len")
        ax_t.plot(
            sub["seq_len"],
            sub["s_per_token"],
            marker="o",
            color=pal[kv],
            label=f"{kv} ({int(sub['kv_heads'].iloc[0])} KV heads)",
        )
        if turns is not None and (turns["kv"] == kv).any():
            t = turns[turns["kv"] == kv].sort_values("seq_len")
            ax_t.plot(
                t["seq_len"], t["s_per_token"], marker="s", ls="--", color=pal[kv], alpha=0.8, label=f"{kv}, in turns"
            )
    ax_t.set_xscale("log", base=2)
    ax_t.set_xticks(lengths, [str(t) for t in lengths])
    ax_t.minorticks_off()
    ax_t.set_xlabel("prompt length (tokens)")
    ax_t.set_ylabel("time per generated token, s (median)")
    ax_t.set_ylim(0, None)
    ax_t.legend(fontsize=8)
    ax_t.set_title(
        "decode time per token (shared 2-core CPU: noisy)"
        + ("\nsolid: the trials; dashed: policies timed in turns" if turns is not None else ""),
        fontsize=10,
    )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def interleaved(args) -> pd.DataFrame:
    """Time per token of every KV policy measured in turns, step by step, in one process: each length's
    policies see the same machine load (the trials above run minutes apart on a shared machine)."""
    import statistics
    import time

    import torch

    from txlab.model.decode import Inference, generate_tokens
    from txlab.trial.infer import build_model
    from txlab.trial.resolve import resolve

    rows = []
    for T in args.lengths:
        states = {}
        for kv in args.kv:
            extra = {"model.n_kv_heads": args.grouped_kv_heads} if kv == "grouped" else {}
            cfg = load_config(None, {**base(args.size, T, args.decode_tokens, args.k_chunk, kv), **extra})
            model = build_model(resolve(cfg))
            prompt = torch.randint(0, cfg.model.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
            run = Inference(model, T + args.decode_tokens, 1, cfg.policy.kv, cfg.policy.k_chunk)
            tokens = generate_tokens(run, prompt)  # the engine's loop, greedy
            next(tokens)  # the prefill (untimed) and its token
            states[kv] = [tokens, []]
            print(f"  interleaved: {kv} prefilled {T} tokens", file=sys.stderr, flush=True)
        for _ in range(args.decode_tokens):
            for kv, (tokens, times) in states.items():
                t0 = time.perf_counter()
                next(tokens)  # one step
                times.append(time.perf_counter() - t0)
        for kv, (_, times) in states.items():
            rows.append({"seq_len": T, "kv": kv, "s_per_token": statistics.median(times), "tokens": len(times)})
        del states
    out = pd.DataFrame(rows)
    for T, grp in out.groupby("seq_len"):
        ref = grp[grp["kv"] == "cache"]["s_per_token"]
        if len(ref):
            out.loc[grp.index, "vs_cache"] = grp["s_per_token"] / ref.iloc[0]
    return out


def trained_int4(run_dir: str, group: int, batches: int = 8) -> pd.DataFrame:
    """int4 against full precision on a model `txlab train` trained (a run directory), over held-out
    batches of its own data (the corpus for examples/train_debug.yaml): logit error, next-token agreement,
    and each model's accuracy and loss on the true next tokens."""
    import copy

    import torch
    import torch.nn.functional as F

    from txlab.data.loader import open_data
    from txlab.model.quant import weight_bytes
    from txlab.train.checkpoint import load_model

    model, cfg = load_model(run_dir, "cpu")
    model.eval()
    qmodel = quantize_model(copy.deepcopy(model), group)
    diff2 = ref2 = 0.0
    agree = n = 0
    stats = {"fp": [0, 0.0], "int4": [0, 0.0]}
    with torch.no_grad():
        for b in open_data(cfg).val.eval_batches(batches):
            x, y = b.tokens[:, :-1], b.tokens[:, 1:]
            lf = F.linear(model(x), model.lm_head.weight).float()
            lq = F.linear(qmodel(x), qmodel.lm_head.weight).float()
            diff2 += float(((lq - lf) ** 2).sum())
            ref2 += float((lf**2).sum())
            agree += int((lq.argmax(-1) == lf.argmax(-1)).sum())
            n += y.numel()
            for name, lg in (("fp", lf), ("int4", lq)):
                stats[name][0] += int((lg.argmax(-1) == y).sum())
                stats[name][1] += float(F.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction="sum"))
    return pd.DataFrame(
        [
            {
                "model": f"{cfg.model.size} trained ({run_dir})",
                "group": group,
                "positions": n,
                "weights_fp_MiB": weight_bytes(model) / MIB,
                "weights_MiB": weight_bytes(qmodel) / MIB,
                "logit_rel_error": (diff2 / ref2) ** 0.5,
                "next_token_agreement": agree / n,
                "accuracy_fp": stats["fp"][0] / n,
                "accuracy_int4": stats["int4"][0] / n,
                "loss_fp": stats["fp"][1] / n,
                "loss_int4": stats["int4"][1] / n,
            }
        ]
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--kv", nargs="+", default=list(KV_POLICIES), choices=list(KV_POLICIES))
    ap.add_argument("--grouped-kv-heads", type=int, default=4, help="model.n_kv_heads of the grouped variant")
    ap.add_argument("--size", default="gpt2-small")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--k-chunk", type=int, default=512, help="recompute: positions of K/V rebuilt per tile")
    ap.add_argument("--quant-group", type=int, default=128)
    ap.add_argument("--no-quant", action="store_true", help="skip the int4 comparison")
    ap.add_argument("--no-kv", action="store_true", help="only the int4 comparison")
    ap.add_argument(
        "--trained",
        metavar="RUN_DIR",
        help="only int4 against full precision on a model trained by "
        "`txlab train` (e.g. examples/train_debug.yaml), on its held-out data",
    )
    ap.add_argument(
        "--interleaved",
        action="store_true",
        help="only time decode steps of the KV policies in turns in this process (no trials, no memory)",
    )
    ap.add_argument("--store", default="results/bench_inference")
    args = ap.parse_args(argv)

    if args.trained:
        tab = trained_int4(args.trained, args.quant_group)
        with pd.option_context(
            "display.width", 250, "display.max_columns", 30, "display.float_format", "{:.4f}".format
        ):
            print(tab.to_string(index=False))
        return 0
    if args.interleaved:
        tab = interleaved(args)
        with pd.option_context("display.float_format", "{:.3f}".format):
            print(
                f"{args.size}: decode time per token, policies stepped in turns ({args.decode_tokens} tokens each, median)"
            )
            print(tab.to_string(index=False))
        path = Path(args.store).parent / f"{Path(args.store).name}_interleaved.parquet"
        tab.to_parquet(path)
        print(f"wrote {path}")
        return 0
    store = Store.open(args.store, create=True)
    done = store.final_keys()
    cfgs = ([] if args.no_kv else list(kv_configs(args))) + ([] if args.no_quant else list(quant_configs(args)))
    for cfg in cfgs:
        if cfg.trial_key in done:
            continue
        print(
            f"running kv {cfg.policy.kv} ({cfg.model.n_kv_heads} KV heads), quant {cfg.model.quant} at seq_len "
            f"{cfg.workload.seq_len} ...",
            file=sys.stderr,
            flush=True,
        )
        store.write_row(run_trial(cfg, progress=True))
    df = Store.open(args.store).read_pandas()  # a fresh listing, with the rows just written
    kv_keys = {c.trial_key for c in kv_configs(args)}
    tab = kv_table(df[df["trial_key"].isin(kv_keys)])
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print(
            f"{args.size}, decode: prefill + {args.decode_tokens} tokens, batch 1, fp32, "
            f"device {df['device'].iloc[0]}; KV analytic = 2 * L * n_kv_heads * head_dim * (seq_len + decode_tokens) * 4 B"
        )
        print(tab.to_string(index=False))
        out = Path(args.store)
        tab.to_parquet(out.parent / f"{out.name}_kv.parquet")
        written = [out.parent / f"{out.name}_kv.parquet"]
        if not args.no_quant:
            qkeys = {c.trial_key for c in quant_configs(args)}
            qtab = quant_table(df[df["trial_key"].isin(qkeys)])
            print(f"\nint4 projections (group {args.quant_group}) against full precision, data.source corpus:")
            print(qtab.to_string(index=False))
            qtab.to_parquet(out.parent / f"{out.name}_int4.parquet")
            written.append(out.parent / f"{out.name}_int4.parquet")
    turns_path = out.parent / f"{out.name}_interleaved.parquet"  # from --interleaved, when it was run
    turns = pd.read_parquet(turns_path) if turns_path.exists() else None
    plot(
        tab,
        out.parent / f"{out.name}.png",
        f"{args.size}: decode (prefill + {args.decode_tokens} tokens) under each KV policy, fp32, batch 1, CPU tracker",
        turns,
    )
    written.append(out.parent / f"{out.name}.png")
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
