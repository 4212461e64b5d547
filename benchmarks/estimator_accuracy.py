"""How close is the fake-tensor estimate to the measured peak? Every policy preset over a grid of shapes,
each trial measured (`run_trial`, on this machine's device) and estimated (`estimate_trial`, same device
kind), then the relative error of the peak per preset (max and median).

    python benchmarks/estimator_accuracy.py [--out results/benchmarks/estimator_accuracy] [--quick]

Writes rows.parquet (one row per trial: measured and estimated figures side by side), errors.parquet
(per preset) and error.png (estimated vs measured peak, and error per preset). On CUDA the measured peak
is the caching allocator's (`max_memory_allocated`), so the comparison includes the allocator rounding
the estimator models and the kernel workspaces it does not.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = ["naive", "sdpa", "checkpoint", "selective", "recompute"]


def grid(quick: bool) -> list[dict]:
    lengths = [128, 512] if quick else [128, 256, 512, 1024]
    widths = [(2, 128, 4)] if quick else [(2, 128, 4), (4, 256, 8)]
    shapes = []
    for T, (L, d, h), batch, dropout in itertools.product(lengths, widths, [1, 2], [0.0, 0.1]):
        if quick and (batch, dropout) not in ((1, 0.0), (2, 0.1)):
            continue
        shapes.append(
            {
                "model.n_layers": L,
                "model.d_model": d,
                "model.n_heads": h,
                "model.vocab_size": 256,
                "workload.seq_len": T,
                "workload.batch_size": batch,
                "model.dropout": dropout,
                "workload.steps": 1,
                "workload.warmup_steps": 0,
            }
        )
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/benchmarks/estimator_accuracy")
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--device", default="auto", help="measure.device of the measured runs")
    args = ap.parse_args()

    import pandas as pd

    from txlab.config import load_config
    from txlab.runtime.device import resolve_device
    from txlab.trial import estimate_trial, run_trial

    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    t_start = time.perf_counter()
    for shape, preset in itertools.product(grid(args.quick), PRESETS):
        over = {**shape, "policy.name": preset, "measure.device": device.type}
        if preset == "recompute":
            T = shape["workload.seq_len"]
            over["policy.loss_chunk"] = T // 4  # its fused attention has no tiles
        cfg = load_config(None, over)
        measured = run_trial(cfg)
        est = estimate_trial(cfg, device.type)
        rec = {k: v for k, v in cfg.flat().items() if k.startswith(("model.", "workload.", "policy."))}
        rec.update(
            device=measured["device"],
            status=measured["status"],
            est_status=est["status"],
            measured_peak_bytes=measured["peak_bytes"],
            estimated_peak_bytes=est["peak_bytes"],
            measured_rss_bytes=measured["peak_rss_bytes"],  # CPU: resident high-water mark, the tracker's check
            measured_activations_bytes=measured["activations_bytes"],
            estimated_activations_bytes=est["activations_bytes"],
            formula_activation_bytes=est["formula_activation_bytes"],
            estimate_s=est["duration_s"],
            measure_s=measured["duration_s"],
        )
        if measured["peak_bytes"] and est["peak_bytes"]:
            rec["rel_error"] = est["peak_bytes"] / measured["peak_bytes"] - 1
        records.append(rec)
        print(
            f"{preset:10s} L{shape['model.n_layers']} d{shape['model.d_model']} T{shape['workload.seq_len']:5d} "
            f"b{shape['workload.batch_size']} drop {shape['model.dropout']}: measured {measured['peak_bytes'] / 2**20:8.2f} MiB "
            f"estimated {est['peak_bytes'] / 2**20:8.2f} MiB  error {rec.get('rel_error', float('nan')):+.4%}",
            flush=True,
        )

    rows = pd.DataFrame(records)
    rows.to_parquet(out / "rows.parquet")
    rows["abs_error"] = rows["rel_error"].abs()
    table = (
        rows.groupby("policy.name", sort=False)["abs_error"]
        .agg(trials="count", max_error="max", median_error="median")
        .reset_index()
    )
    table.to_parquet(out / "errors.parquet")
    print()
    print(f"device {rows['device'].iloc[0]}, {len(rows)} trials, {time.perf_counter() - t_start:.0f} s")
    print(f"{'preset':12s} {'trials':>6s} {'max |error|':>12s} {'median |error|':>15s}")
    for r in table.itertuples():
        print(f"{r[1]:12s} {r.trials:6d} {r.max_error:12.4%} {r.median_error:15.4%}")
    plot(rows, out / "error.png")
    print(f"wrote {out}/rows.parquet, errors.parquet, error.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for preset, g in rows.groupby("policy.name", sort=False):
        ax1.scatter(g["measured_peak_bytes"] / 2**20, g["estimated_peak_bytes"] / 2**20, label=preset, s=18)
        ax2.scatter([preset] * len(g), g["rel_error"] * 100, s=18)
    lim = [rows["measured_peak_bytes"].min() / 2**20 * 0.8, rows["measured_peak_bytes"].max() / 2**20 * 1.25]
    ax1.plot(lim, lim, color="grey", lw=0.8, ls="--", label="estimate = measured")
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="measured peak (MiB, 2^20 bytes)",
        ylabel="estimated peak (MiB)",
        title=f"Estimated vs measured peak ({rows['device'].iloc[0]})",
    )
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax1.xaxis, ax1.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax1.tick_params(which="minor", labelsize=7)
    ax1.legend(fontsize=8)
    ax2.axhspan(-5, 5, color="green", alpha=0.08, label="±5% target")
    ax2.axhline(0, color="grey", lw=0.8)
    ax2.set(ylabel="estimate error (% of measured peak)", title="Error per policy preset")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
