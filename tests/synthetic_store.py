"""Synthetic result rows shaped like a GPU sweep, for analysis tests and for looking at the plots.

Not measurements: a rough analytic memory and time model (GPT-2 small width, fp32, AdamW) with the
statuses a real sweep produces (oom above the cap, over_budget just around it, one error, estimated rows
beyond the measured lengths). Host and sweep name say "synthetic".

    python tests/synthetic_store.py DIR            # writes a demo store to DIR
    python tests/synthetic_store.py DIR sweep400   # the 400-trial estimate sweep (8 x 10 x 5)
    python tests/synthetic_store.py DIR sizes      # the estimated frontier of gpt2 small..xl
    python tests/synthetic_store.py DIR demo --predicted  # with the time model's columns (h100-sxm, $3/h)

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

# sweeps/smoke.yaml as it measured on a 2-core CPU (txlab 0.2): policy, seq_len, measure.budget_gib, status,
# peak_bytes, step_time_s and (params, grads, optimizer, activations, other) bytes at the peak. Checkpoint
# and recompute peak alike at every length; naive and sdpa stop over the 0.15 GiB budget at 2048 (their
# peaks there are lower bounds); the step times are one loaded machine's.
SMOKE_MEASURED = [
    ("naive", 512, None, "ok", 98521324, 0.4428, (13424640, 2369536, 26849488, 46170124, 9707536)),
    ("sdpa", 512, None, "ok", 78365932, 0.3448, (13424640, 2048, 26849488, 34148364, 3941392)),
    ("checkpoint", 512, None, "ok", 62628076, 0.3438, (13424640, 10528768, 26849488, 6836236, 4988944)),
    ("recompute", 512, None, "ok", 62628076, 0.1905, (13424640, 10528768, 26849488, 7098380, 4726800)),
    ("naive", 1024, None, "ok", 208138476, 0.4659, (13948928, 2369536, 27898064, 127991820, 35930128)),
    ("sdpa", 1024, None, "ok", 116716780, 0.4057, (13948928, 2048, 27898064, 68296716, 6571024)),
    ("checkpoint", 1024, None, "ok", 75763948, 0.8255, (13948928, 10528768, 27898064, 13672460, 9715728)),
    ("recompute", 1024, None, "ok", 75763948, 0.5872, (13948928, 10528768, 27898064, 13934604, 9453584)),
    ("naive", 2048, None, "ok", 584659180, 2.0688, (14997504, 2369536, 29995216, 398589964, 138706960)),
    ("sdpa", 2048, None, "ok", 193418476, 0.7207, (14997504, 2048, 29995216, 136593420, 11830288)),
    ("checkpoint", 2048, None, "ok", 102035692, 1.6242, (14997504, 10528768, 29995216, 27344908, 19169296)),
    ("recompute", 2048, None, "ok", 102035692, 2.8170, (14997504, 10528768, 29995216, 27607052, 18907152)),
    ("naive", 2048, 0.15, "over_budget", 163960848, None, None),
    ("sdpa", 2048, 0.15, "over_budget", 162373656, None, None),
    ("checkpoint", 2048, 0.15, "ok", 102035692, 0.9824, (14997504, 10528768, 29995216, 27344908, 19169296)),
    ("recompute", 2048, 0.15, "ok", 102035692, 0.9733, (14997504, 10528768, 29995216, 27607052, 18907152)),
]


def smoke_rows() -> list[dict]:
    """The 16 rows of the smoke sweep (`SMOKE_MEASURED`), shaped as `txlab sweep` writes them."""
    rows = []
    for policy, T, budget, status, peak, step, parts in SMOKE_MEASURED:
        over = {"model.size": "debug", "policy.name": policy, "workload.seq_len": T, "workload.batch_size": 1,
                "workload.steps": 3, "workload.warmup_steps": 1, "measure.device": "cpu", "measure.budget_gib": budget}  # fmt: skip
        cfg = load_config(None, over)
        names = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes")
        rows.append(
            {
                **cfg.flat(),
                "trial_key": cfg.trial_key,
                "sweep": "smoke",
                "host": "synthetic",
                "device": "cpu",
                "device_capacity_bytes": 25276203008,
                "measured": True,
                "status": status,
                "error": None if status == "ok" else f"tracked memory over the budget of {budget} GiB",
                "peak_bytes": peak,
                "step_time_s": step,
                "tokens_per_s": T / step if step else None,
                **dict(zip(names, parts or (None,) * len(names))),
            }
        )
    return rows


# the time model's error on the measured rows, by policy: a spread for the report's table to find (synthetic)
PREDICTION_ERROR = {"naive": -0.2, "sdpa": -0.05, "selective": -0.08, "checkpoint": -0.1, "recompute": 0.08}


def with_predictions(rows: list[dict], hardware: str = "h100-sxm", usd_per_device_hour: float | None = 3.0):
    """The rows with the time model's columns, as `measure.hardware` (and a price) would give them: every ok row
    a predicted step (measured rows: their step time off by PREDICTION_ERROR; estimates: the analytic step)."""
    out = []
    for r in rows:
        r = {**r, "measure.hardware": hardware, "measure.usd_per_device_hour": usd_per_device_hour}
        if r["status"] == "ok":
            T, n = r["workload.seq_len"], r.get("parallel.fsdp") or 1
            flops = (6 * r["n_params"] + 12 * r["model.n_layers"] * r["model.d_model"] * T) * T
            step = r["step_time_s"] or flops / 3.2e14
            pred = step * (1 + PREDICTION_ERROR.get(r["policy.name"], 0.0)) if r["step_time_s"] else step
            r.update(hardware=hardware, predicted_step_time_s=pred, predicted_tokens_per_s=T / pred,
                     predicted_exposed_comm_s=0.0)  # fmt: skip
            if usd_per_device_hour is not None:
                r["predicted_usd_per_mtok"] = usd_per_device_hour * n * pred / 3600 / T * 1e6
        out.append(r)
    return out


def write_store(path, rows) -> Store:
    store = Store.open(str(path), create=True)
    for r in rows:
        store.write_row(r)
    return store


if __name__ == "__main__":
    which = sys.argv[2] if len(sys.argv) > 2 else "demo"
    rows = synthetic_rows(**STORES[which])
    if "--predicted" in sys.argv:  # the time model's columns too
        rows = with_predictions(rows)
    write_store(sys.argv[1], rows)
    print(f"synthetic store ({which}, {len(rows)} rows) written to {sys.argv[1]}")
