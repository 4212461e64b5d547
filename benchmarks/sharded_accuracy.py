"""Sharded trials: the fake-process-group estimate against the measured per-rank peak, and what sharding
saves, on this machine. Each shape is measured as a one-device trial and as an N-rank FSDP2 trial
(`run_trial`, N processes over gloo on CPU, NCCL on CUDA), and estimated for the same N
(`estimate_trial`: rank 0 of N on torch's fake process group).

    python benchmarks/sharded_accuracy.py [--ranks 2 4] [--out results/benchmarks/sharded_accuracy]

Writes rows.parquet and prints the table: one-device peak, per-rank peak measured and estimated, the
estimate's relative error, the loss of both (equal: the ranks together see the one-device batch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import _common as C  # noqa: E402

BASE = {"model.n_layers": 4, "model.d_model": 128, "model.n_heads": 4, "model.vocab_size": 256,
        "workload.seq_len": 256, "workload.batch_size": 4, "workload.steps": 1, "workload.warmup_steps": 0,
        "measure.device": "cpu"}  # fmt: skip
SHAPES = {
    "sdpa": {"policy.name": "sdpa"},
    "checkpoint": {"policy.name": "checkpoint"},
    "checkpoint, gathered kept": {"policy.name": "checkpoint", "parallel.reshard_after_forward": False},
    "recompute, llama-like": {"policy.name": "recompute", "policy.loss_chunk": 128, "model.pos": "rope",
                              "model.norm": "rmsnorm",
                              "model.mlp": "swiglu", "model.n_kv_heads": 2},
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "sharded_accuracy"))
    args = p.parse_args()

    import pandas as pd

    from txlab.config import load_config
    from txlab.trial import estimate_trial, run_trial

    rows = []
    print(C.machine_line(), file=sys.stderr)
    for name, shape in SHAPES.items():
        one = run_trial(load_config(None, {**BASE, **shape}))
        for n in args.ranks:
            cfg = load_config(None, {**BASE, **shape, "parallel.fsdp": n})
            measured, estimated = run_trial(cfg), estimate_trial(cfg, "cpu")
            rows.append({
                "shape": name, "ranks": n, "one_device_MiB": one["peak_bytes"] / 2**20,
                "rank_measured_MiB": measured["peak_bytes"] / 2**20, "rank_estimated_MiB": estimated["peak_bytes"] / 2**20,
                "estimate_error": estimated["peak_bytes"] / measured["peak_bytes"] - 1,
                "spread_MiB": measured["peak_spread_bytes"] / 2**20, "gathered_MiB": measured["gathered_params_bytes"] / 2**20,
                "loss_one_device": one["loss"], "loss_sharded": measured["loss"],
            })  # fmt: skip
            print(f"{name:<26} N={n}  one device {rows[-1]['one_device_MiB']:.1f} MiB  rank measured "
                  f"{rows[-1]['rank_measured_MiB']:.1f}  estimated {rows[-1]['rank_estimated_MiB']:.1f} MiB "
                  f"({rows[-1]['estimate_error']:+.2%})", file=sys.stderr, flush=True)  # fmt: skip
    df = pd.DataFrame(rows)
    C.print_table(df)
    print(f"wrote {C.write_parquet(df, Path(args.out), 'rows')}")


if __name__ == "__main__":
    main()
