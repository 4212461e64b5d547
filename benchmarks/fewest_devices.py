"""The fewest devices that train each model at each length, with the global batch held in tokens and every layout,
recomputation policy and micro-batch split allowed to share the work: `txlab advise --devices 1-1024` per row.

    python benchmarks/fewest_devices.py [--out results/benchmarks/fewest_devices] [--hardware h100-sxm]
        [--tokens 2097152] [--models llama-3.2-1b,llama-3.1-8b,llama-3.1-70b] [--lengths 8192,32768]

For each model and length: the global batch is `--tokens` tokens a step (2M: 256 sequences of 8192 tokens, 64 of
32768), bf16, AdamW. advise walks the device counts 1, 2, 4, ... 1024 up from the first the training state allows
(16 bytes a parameter over N devices), probes each layout's leanest corner (recompute, the most micro-steps) and,
at the first count where one fits, searches that count in full for the fastest candidate (docs/advise.md). Every
figure is a prediction: the estimator's peak on fake tensors, the time model's step time on `--hardware`.

The rows (one per model and length) go to fewest_devices.parquet and a table on stdout; the estimates themselves to
the store `<out>/store` (a rerun reuses them: only new candidates are estimated). The plot: fewest devices per model
and length, with the FSDP-only answer of sweeps/fewest_devices.yaml (one sequence per rank, from docs/sharding.md)
beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import _common as C  # noqa: E402
import yaml  # noqa: E402

# The FSDP-only answer before layouts and accumulation (docs/sharding.md, "The fewest devices that fit": estimates
# of sweeps/fewest_devices.yaml, one sequence per rank, 80 GiB, degrees 1/8/64/512 tried; None: > 512). `recompute`.
FSDP_ONLY = {
    ("llama-3.2-1b", 8192): 1,
    ("llama-3.2-1b", 32768): 1,
    ("llama-3.1-8b", 8192): 8,
    ("llama-3.1-8b", 32768): 8,
    ("llama-3.1-70b", 8192): 64,
    ("llama-3.1-70b", 32768): 512,
}


def advise_row(model: str, seq_len: int, tokens: int, hardware: str, out: Path, devices: str) -> dict:
    cfg = {"model": {"size": model}, "workload": {"seq_len": seq_len, "batch_size": max(1, tokens // seq_len),
                                                  "dtype": "bf16"}}  # fmt: skip
    path = out / "configs" / f"{model}_{seq_len}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    from txlab.advise.command import advise
    from txlab.cli import build_parser
    from txlab.config import ConfigError

    argv = ["advise", str(path), "--hardware", hardware, "--devices", devices, "--json", "--store",
            str(out / "store"), "--out", str(out / "winners" / path.stem)]  # fmt: skip
    buf, why = io.StringIO(), None
    t0 = time.monotonic()
    with contextlib.redirect_stdout(buf):
        try:
            rc = advise(build_parser().parse_args(argv), progress=True)  # progress on stderr, the JSON on stdout
        except ConfigError as e:  # no count of the range fits: the answer is "more than the range"
            rc, why = 2, str(e)
    wall = time.monotonic() - t0
    row = {"model": model, "seq_len": seq_len, "batch_size": cfg["workload"]["batch_size"], "hardware": hardware,
           "wall_s": round(wall, 1), "rc": rc, "fsdp_only_one_seq_per_rank": FSDP_ONLY.get((model, seq_len))}  # fmt: skip
    if rc != 0:
        return {**row, "devices": None, "winner": None, "why_not": why}
    doc = json.loads(buf.getvalue())
    best = doc["candidates"][0]
    counts = doc["devices"]["counts"]
    return {
        **row,
        "devices": doc["devices"]["chosen"],
        "winner": best["candidate"],
        "peak_gib": best["peak_bytes"] / C.GiB,
        "predicted_step_time_s": best.get("predicted_step_time_s"),
        "predicted_tokens_per_s_per_device": (best.get("predicted_tokens_per_s") or 0) / doc["devices"]["chosen"],
        "predicted_mfu": best.get("predicted_mfu"),
        "counts_ruled_out": "; ".join(f"{c['devices']}: {c['why_not'][:80]}" for c in counts if c["fits"] is False),
        "estimates": len(doc["candidates"]),
    }


def plot(df, path: Path) -> Path:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    labels = [f"{m}\n{s // 1024}k" for m, s in zip(df["model"], df["seq_len"])]
    x = range(len(df))
    old = [v if v == v and v is not None else float("nan") for v in df["fsdp_only_one_seq_per_rank"]]
    if any(v == v for v in old):  # the MoE presets have no FSDP-only answer: no grey bars, no legend entry
        ax.bar([i - 0.2 for i in x], old, width=0.4, color="0.65", label="FSDP only, one sequence a rank, 80 GiB")
    ax.bar([i + 0.2 for i in x], df["devices"], width=0.4, color="tab:blue",
           label="any layout + accumulation, 2M-token batch")  # fmt: skip
    for i, (n, w) in enumerate(zip(df["devices"], df["winner"])):
        if n == n and n is not None:
            ax.annotate(str(w).split(",")[0], (i + 0.2, n), xytext=(0, 3), textcoords="offset points", ha="center",
                        fontsize=6, rotation=90, va="bottom")  # fmt: skip
    ax.set_yscale("log", base=2)
    top = max([v for v in list(old) + list(df["devices"]) if v == v and v is not None] + [1])
    ticks = [2**i for i in range(0, int(top).bit_length() + 1)]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_ylim(0.8, top * 8)  # room above the tallest bar for its rotated layout label
    ax.minorticks_off()
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("fewest devices that fit (log scale)")
    ax.set_title(f"fewest {df['hardware'].iloc[0]} devices that train each model (predicted)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.text(0.01, 0.01, "Every bar is an estimate (fake tensors). Blue: the fastest layout at that count. "
             "Grey: sweeps/fewest_devices.yaml (degrees 1, 8, 64, 512).", fontsize=7, color="0.3")  # fmt: skip
    return C.save_fig(fig, path, rect=(0, 0.04, 1, 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/benchmarks/fewest_devices")
    ap.add_argument("--hardware", default="h100-sxm")
    ap.add_argument("--tokens", type=int, default=2**21, help="global batch in tokens a step")
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b,llama-3.1-70b")
    ap.add_argument("--lengths", default="8192,32768")
    ap.add_argument("--devices", default="1-1024")
    args = ap.parse_args()
    import pandas as pd

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        for seq_len in (int(s) for s in args.lengths.split(",")):
            print(f"[fewest] {model} at {seq_len} tokens ... ({C.machine_line()})", file=sys.stderr, flush=True)
            rows.append(advise_row(model, seq_len, args.tokens, args.hardware, out, args.devices))
            print(f"[fewest] {rows[-1]}", file=sys.stderr, flush=True)
            df = pd.DataFrame(rows)
            C.write_parquet(df, out, "fewest_devices")
    C.print_table(df)
    print(f"plot: {plot(df, out / 'fewest_devices.png')}")
    print(C.machine_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
