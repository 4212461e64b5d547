"""What `workload.compile: true` buys: training trials compiled by torch.compile (inductor) against the same
trials eager, per preset, with the compile time apart from the step time.

    python benchmarks/compile_gain.py                                   # gpt2-small, 1024 tokens: sdpa, checkpoint, recompute
    python benchmarks/compile_gain.py --presets sdpa selective --seq-len 2048 --steps 5
    python benchmarks/compile_gain.py --from results/benchmarks/compile_gain/compile_gain.parquet

Each trial is `txlab.trial.run_trial` (a full training step: forward, backward, AdamW; the peak over
its two monitored steps, the median of `--steps` timed steps after `--warmup` untimed ones; a compiled
trial takes one compiling step first and reports it as compile_s). Eager and compiled trials of a preset
run back to back, alternating which goes first per preset, so load drifts hit both; the load is printed
at the start and the end. CPU here (inductor's C++ backend); on CUDA the same script measures Triton code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def run(presets, seq_len: int, steps: int, warmup: int, size: str = "gpt2-small", device: str = "cpu", log=True):
    import pandas as pd
    import torch

    from txlab.config import load_config
    from txlab.trial import run_trial

    rows = []
    for i, preset in enumerate(presets):
        over = {
            "model.size": size,
            "workload.seq_len": seq_len,
            "workload.steps": steps,
            "workload.warmup_steps": warmup,
            "policy.name": preset,
            "measure.device": device,
        }
        if preset == "planned":
            over["measure.budget_gib"] = 100.0
        for compiled in (False, True) if i % 2 == 0 else (True, False):
            torch._dynamo.reset()
            row = run_trial(load_config(None, {**over, "workload.compile": compiled}))
            rows.append(
                {
                    "preset": preset,
                    "compiled": compiled,
                    "status": row["status"],
                    "error": row["error"],
                    "step_time_s": row["step_time_s"],
                    "compile_s": row["compile_s"],
                    "peak_GiB": None if row["peak_bytes"] is None else row["peak_bytes"] / C.GiB,
                    "loss": row["loss"],
                    "seq_len": seq_len,
                    "device": row["device"],
                    **{f"machine_{k}": v for k, v in C.machine().items()},
                }
            )
            if log:
                r = rows[-1]
                print(
                    f"{preset:<11} compiled={compiled!s:<5} {r['status']} step {r['step_time_s']} s "
                    f"compile {r['compile_s']} s peak {r['peak_GiB']}",
                    file=sys.stderr,
                    flush=True,
                )
    return gains(pd.DataFrame(rows))


def gains(df):
    eager = df[~df["compiled"]].set_index("preset")["step_time_s"]
    df["speedup_vs_eager"] = [
        eager.get(p) / t if c and t and eager.get(p) else None
        for p, c, t in zip(df["preset"], df["compiled"], df["step_time_s"])
    ]
    return df


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["sdpa", "checkpoint", "recompute"])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--size", default="gpt2-small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="results/benchmarks/compile_gain")
    ap.add_argument("--from", dest="stored", help="reprint a stored compile_gain.parquet; run nothing")
    args = ap.parse_args(argv)
    if args.stored:
        import pandas as pd

        df = pd.read_parquet(args.stored)
    else:
        print(C.machine_line(), flush=True)
        df = run(args.presets, args.seq_len, args.steps, args.warmup, args.size, args.device)
        print(C.machine_line())
        print(f"wrote {C.write_parquet(df, Path(args.out), 'compile_gain')}")
    C.print_table(
        df[["preset", "compiled", "status", "step_time_s", "compile_s", "speedup_vs_eager", "peak_GiB", "loss"]]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
