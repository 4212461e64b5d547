"""Tensor-parallel layouts: the fake-mesh estimate against the measured per-rank peak, and what each layout
saves, on this machine. Each shape is measured as a one-device trial and in each layout (`run_trial`: the
fsdp x tp ranks as processes over gloo on CPU, NCCL on CUDA), and estimated for the same layout
(`estimate_trial`: rank 0 of the mesh on torch's fake process group).

    python benchmarks/tp_accuracy.py [--out results/benchmarks/tp_accuracy]

Writes rows.parquet and prints the table: one-device peak, per-rank peak measured (the largest rank) and
estimated (rank 0), the estimate's relative error, the loss of both (equal: the ranks compute the
one-device step).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import _common as C  # noqa: E402

BASE = {"model.n_layers": 4, "model.d_model": 128, "workload.seq_len": 256, "workload.batch_size": 4,
        "workload.steps": 1, "workload.warmup_steps": 0, "measure.device": "cpu"}  # fmt: skip
SHAPES = {
    # GPT-2's shape: learned positions, LayerNorm, GELU, biases, tied embeddings; 257 tokens: uneven over TP
    "checkpoint, GPT-2-like": {"policy.name": "checkpoint", "model.n_heads": 4, "model.vocab_size": 257},
    # Llama's: RoPE, RMSNorm, SwiGLU, 8 query heads sharing 4 KV heads, untied, no biases
    "recompute, Llama-like": {"policy.name": "recompute", "policy.loss_chunk": 128, "model.pos": "rope",
                              "model.norm": "rmsnorm", "model.mlp": "swiglu", "model.n_heads": 8,
                              "model.n_kv_heads": 4, "model.vocab_size": 256, "model.tie_weights": False,
                              "model.attn_bias": False, "model.attn_out_bias": False, "model.mlp_bias": False},
}  # fmt: skip
LAYOUTS = {
    "tp 2": {"parallel.tp": 2},
    "tp 2, no sequence parallelism": {"parallel.tp": 2, "parallel.sequence_parallel": False},
    "tp 4": {"parallel.tp": 4},
    "fsdp 2 x tp 2": {"parallel.fsdp": 2, "parallel.tp": 2},
    "fsdp 4 (for comparison)": {"parallel.fsdp": 4},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "tp_accuracy"))
    args = p.parse_args()

    import pandas as pd

    from txlab.config import load_config
    from txlab.trial import estimate_trial, run_trial

    rows = []
    print(C.machine_line(), file=sys.stderr)
    for name, shape in SHAPES.items():
        one = run_trial(load_config(None, {**BASE, **shape}))
        for layout, keys in LAYOUTS.items():
            cfg = load_config(None, {**BASE, **shape, **keys})
            measured, estimated = run_trial(cfg), estimate_trial(cfg, "cpu")
            assert measured["status"] == estimated["status"] == "ok", (measured["error"], estimated["error"])
            rows.append({
                "shape": name, "layout": layout, "one_device_MiB": one["peak_bytes"] / 2**20,
                "rank_measured_MiB": measured["peak_bytes"] / 2**20, "rank_estimated_MiB": estimated["peak_bytes"] / 2**20,
                "estimate_error": estimated["peak_bytes"] / measured["peak_bytes"] - 1,
                "spread_MiB": measured["peak_spread_bytes"] / 2**20,
                "params_MiB": measured["params_bytes"] / 2**20, "optimizer_MiB": measured["optimizer_bytes"] / 2**20,
                "activations_MiB": measured["activations_bytes"] / 2**20, "other_MiB": measured["other_bytes"] / 2**20,
                "loss_one_device": one["loss"], "loss_layout": measured["loss"],
            })  # fmt: skip
            print(f"{name:<24} {layout:<30} one device {rows[-1]['one_device_MiB']:.2f} MiB  rank measured "
                  f"{rows[-1]['rank_measured_MiB']:.2f}  estimated {rows[-1]['rank_estimated_MiB']:.2f} MiB "
                  f"({rows[-1]['estimate_error']:+.2%})", file=sys.stderr, flush=True)  # fmt: skip
    df = pd.DataFrame(rows)
    C.print_table(df)
    print(f"wrote {C.write_parquet(df, Path(args.out), 'rows')}")


if __name__ == "__main__":
    main()
