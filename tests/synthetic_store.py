"""Synthetic result rows shaped like a GPU sweep, for analysis tests and for looking at the plots.

Not measurements: a rough analytic memory and time model (GPT-2 small width, fp32, AdamW) with the
statuses a real sweep produces (oom above the cap, over_budget just around it, one error, estimated rows
beyond the measured lengths). Host and sweep name say "synthetic".

    python tests/synthetic_store.py DIR            # writes a demo store to DIR
    python tests/synthetic_store.py DIR sweep400   # the 400-trial estimate sweep (8 x 10 x 5)
    python tests/synthetic_store.py DIR sizes      # the estimated frontier of gpt2 small..xl

The last two are shaped like `txlab sweep` in estimate mode (every row `measured: false`, `over_budget` past
the budget) at the scale of a real sweep, for checking that plots and the report stay readable.
"""

from __future__ import annotations

import sys

from txlab.config import load_config
from txlab.results.columns import GiB
from txlab.results.store import Store

H100 = "NVIDIA H100 80GB HBM3"


def _model(policy: str, L: int, T: int, q: int, k: int, d: int = 768, V: int = 50257, h: int = 12):
    n = 12 * L * d * d + V * d + T * d
    params, grads, opt = 4 * n, 4 * n, 8 * n
    block = 34 * T * d * 2  # bytes saved per block for backward (fp32)
    logits = 3 * T * V * 4
    if policy == "naive":
        act = L * (block + 3 * h * T * T * 4) + logits
    elif policy == "sdpa":
        act = L * block + logits
    elif policy == "selective":
        act = L * block * 0.55 + logits
    elif policy == "checkpoint":
        act = L * T * d * 4 + block + logits
    else:  # recompute with `policy.attention: chunked` (its kernel until 0.2): chunked attention and loss
        act = L * T * d * 4 + block * 0.7 + 4 * h * q * k + 3 * min(T, 1024) * V * 4
    other = 0.08 * act + 64 * 2**20
    flops = (6 * n + 12 * L * d * T) * T
    factor = {
        "naive": 1.1 + T / 65536,
        "sdpa": 1.0,
        "selective": 1.12,
        "checkpoint": 1.33,
        "recompute": 1.38 + 0.05 * (256 / q) + 0.04 * (256 / k),
    }[policy]
    step = flops / 3.2e14 * factor
    return dict(
        params_bytes=int(params),
        grads_bytes=int(grads),
        optimizer_bytes=int(opt),
        activations_bytes=int(act),
        other_bytes=int(other),
        n_params=n,
        step_time_s=step,
    )


def synthetic_rows(
    depths=(12, 24, 48),
    lengths=(1024, 2048, 4096, 8192, 16384, 32768),
    policies=("naive", "sdpa", "selective", "checkpoint", "recompute"),
    chunks=((256, 256), (256, 1024), (1024, 256), (1024, 1024)),
    estimated_lengths=(65536, 131072),
    budget_gib=80.0,
    error=True,
    sizes=("gpt2-small",),
) -> list[dict]:
    """`depths=None`: each size at its preset's depth (gpt2-small 12 ... gpt2-xl 48)."""
    rows = []
    cap = 80 * GiB
    shapes = [(size, L) for size in sizes for L in (depths or [None])]
    for size, L in shapes:
        for p in policies:
            for T in list(lengths) + list(estimated_lengths):
                measured = T in lengths
                for q, k in chunks if p == "recompute" else [(512, 512)]:
                    if q > T or k > T:
                        continue
                    over = {
                        "model.size": size,
                        **({"model.n_layers": L} if L is not None else {}),
                        "policy.name": p,
                        "workload.seq_len": T,
                        "measure.budget_gib": budget_gib,
                    }
                    if p == "recompute":  # the chunked kernel, so that chunk settings mean something
                        over.update({"policy.attention": "chunked", "policy.q_chunk": q, "policy.k_chunk": k})
                    cfg = load_config(None, over)
                    flat = cfg.flat()
                    m = _model(p, flat["model.n_layers"], T, q, k, d=flat["model.d_model"], h=flat["model.n_heads"])
                    peak = sum(
                        m[c]
                        for c in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes")
                    )
                    row = {
                        **flat,
                        "trial_key": cfg.trial_key + ("" if measured else "e"),
                        "sweep": "synthetic",
                        "host": "synthetic",
                        "device": H100,
                        "device_capacity_bytes": cap,
                        "measured": measured,
                        "status": "ok",
                        "peak_bytes": int(peak),
                        **m,
                        "tokens_per_s": T / m["step_time_s"],
                        "duration_s": 10 * m["step_time_s"] + 5,
                    }
                    if not measured:
                        row["step_time_s"] = row["tokens_per_s"] = None
                        if peak > budget_gib * GiB:
                            row["status"] = "over_budget"
                    elif peak > cap * 1.03:
                        row.update(
                            status="oom",
                            error="CUDA out of memory",
                            peak_bytes=None,
                            activations_bytes=None,
                            other_bytes=None,
                            step_time_s=None,
                            tokens_per_s=None,
                        )
                    elif peak > budget_gib * GiB:
                        row.update(
                            status="over_budget", error=f"peak {peak / GiB:.1f} GiB over budget {budget_gib} GiB"
                        )
                    rows.append(row)
    if error:
        for r in rows:
            if (
                r["policy.name"] == "checkpoint"
                and r["model.n_layers"] == depths[len(depths) // 2]
                and r["workload.seq_len"] == lengths[1]
            ):
                r.update(
                    status="error",
                    error="RuntimeError: CUDA error: an illegal memory access was encountered",
                    peak_bytes=None,
                    step_time_s=None,
                )
    return rows


POW2 = tuple(2**i for i in range(9, 19))  # 512 ... 256k
# 8 depths x 10 lengths x 5 policies = 400 estimates (one chunk setting: an estimate sweep's preset)
SWEEP_400 = dict(
    depths=(6, 12, 18, 24, 32, 40, 48, 64), lengths=(), estimated_lengths=POW2, chunks=((256, 256),), error=False
)
# sweeps/frontier_estimate.yaml: 4 sizes (each at its own depth) x 5 lengths x 5 policies = 100 estimates
SIZES_100 = dict(
    depths=None,
    sizes=("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"),
    lengths=(),
    estimated_lengths=(1024, 4096, 16384, 32768, 65536),
    chunks=((256, 256),),
    error=False,
)
STORES = {"demo": {}, "sweep400": SWEEP_400, "sizes": SIZES_100}


def write_store(path, rows) -> Store:
    store = Store.open(str(path), create=True)
    for r in rows:
        store.write_row(r)
    return store


if __name__ == "__main__":
    which = sys.argv[2] if len(sys.argv) > 2 else "demo"
    rows = synthetic_rows(**STORES[which])
    write_store(sys.argv[1], rows)
    print(f"synthetic store ({which}, {len(rows)} rows) written to {sys.argv[1]}")
