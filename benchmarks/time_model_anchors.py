"""The time model against published training throughput on GPUs: calibration and an independent check.

    python benchmarks/time_model_anchors.py [--fit] [--out results/benchmarks/time_model_anchors]

Each anchor is a published run of PyTorch FSDP (its model, sequence, local batch, GPUs and recomputation) with
its tokens/s per GPU and MFU. The script builds the same step in txlab (the model's shapes as a config), records
its operators on fake tensors for the published layout (txlab.trial.predict: rank 0 of N on the fake process
group), prices them on the catalogue profile of the GPU and compares. Traces are cached under --out (as JSON).

Calibration (--fit), in two steps, on the `calibration` anchors only:
1. `ampere`: the matmul and attention efficiencies (txlab.hardware.efficiency) that minimise the squared log
   error of tokens/s on torchtitan's FSDP2 runs on 64 x A100 (the same stack: PyTorch eager, FSDP2, SDPA);
   the memory-bound efficiency, collective efficiency and latencies keep their stated priors.
2. `hopper`: one factor on those two efficiencies, fitted to the ratio of MosaicML's MPT-7B throughput on
   H100 and on A100 (the same model, sequence and stack on both GPUs, so the stack's own speed cancels).
The `check` anchors are never fitted to; their errors are the model's. torchtitan's H100 benchmark file
(benchmarks/llama3_h100_202412_torchtitan.md, and its earlier copy in docs/performance.md) is kept out of both
sets: it is the project's independent check.

Writes anchors.parquet and prints the table (docs/time_model.md, "Published anchors").
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import _common as C  # noqa: E402

TORCHTITAN = "pytorch/torchtitan docs/performance.md at 4d88a8a44^ (2024), 64 x A100-80GB, FSDP2, bf16"
TORCHTITAN_H100 = "pytorch/torchtitan docs/performance.md at 4d88a8a44^ (2024), Llama 3.1 table, 128 x H100, FSDP2 + TP"
MOSAIC = "mosaicml/llm-foundry scripts/train/benchmarking/README.md at 8c8dd48 (FSDP1 FULL_SHARD, amp_bf16)"

LLAMA3_8B = {"model.size": "llama-3.1-8b"}
LLAMA3_70B = {"model.size": "llama-3.1-70b"}
# Llama 2 (meta-llama/Llama-2-13b-hf, -70b-hf config.json): MHA 40 heads (13B), GQA 64/8 (70B), vocab 32000
LLAMA2 = {"model.size": "llama-3.1-8b", "model.vocab_size": 32000, "model.rope_scaling": "none",
          "model.rope_theta": 10000.0}  # fmt: skip
LLAMA2_13B = {**LLAMA2, "model.n_layers": 40, "model.d_model": 5120, "model.n_heads": 40, "model.n_kv_heads": 40,
              "model.head_dim": 128, "model.mlp_hidden": 13824}  # fmt: skip
LLAMA2_70B = {**LLAMA2, "model.n_layers": 80, "model.d_model": 8192, "model.n_heads": 64, "model.n_kv_heads": 8,
              "model.head_dim": 128, "model.mlp_hidden": 28672}  # fmt: skip
# MPT (llm-foundry yamls): no biases, LayerNorm, GELU MLP x4, tied embeddings, vocab 50368; ALiBi has no
# parameters and no cost in the fused kernel: txlab's learned positions stand in (their table is an embedding)
MPT = {"model.norm": "layernorm", "model.mlp": "gelu", "model.tie_weights": True, "model.vocab_size": 50368,
       "model.attn_bias": False, "model.attn_out_bias": False, "model.mlp_bias": False}  # fmt: skip
MPT_7B = {**MPT, "model.n_layers": 32, "model.d_model": 4096, "model.n_heads": 32, "model.n_kv_heads": 32}
MPT_70B = {**MPT, "model.n_layers": 80, "model.d_model": 8192, "model.n_heads": 64, "model.n_kv_heads": 64}
# Llama 3.1 405B (meta-llama/Llama-3.1-405B config.json): GQA 128/8 heads of 128, MLP 53248
LLAMA31_405B = {"model.size": "llama-3.1-70b", "model.n_layers": 126, "model.d_model": 16384, "model.n_heads": 128,
                "model.n_kv_heads": 8, "model.head_dim": 128, "model.mlp_hidden": 53248}  # fmt: skip

SELECTIVE_OP = {"policy.name": "selective", "policy.selective_save": "torchtitan"}
SELECTIVE_LAYER = {"policy.name": "custom", "policy.attention": "sdpa", "policy.remat": "every",
                   "policy.remat_every": 2, "policy.loss": "full"}  # fmt: skip
FULL_AC = {"policy.name": "checkpoint"}
NO_AC = {"policy.name": "sdpa"}


def anchor(id, role, source, hardware, gpus, seq, local_batch, model, policy, tokens_per_gpu, mfu, note="", tp=1):
    """`local_batch`: sequences per data-parallel rank (a TP group shares its rank's); `gpus`: all of them."""
    return dict(id=id, role=role, source=source, hardware=hardware, gpus=gpus, seq=seq, local_batch=local_batch,
                model=model, policy=policy, published_tokens_per_gpu=tokens_per_gpu, published_mfu=mfu, note=note,
                tp=tp)  # fmt: skip


ANCHORS = [
    # --- calibration: torchtitan FSDP2 on 64 x A100 (the same stack) -----------------------------------
    anchor("tt-l3-8b-selop", "calibration", TORCHTITAN, "a100-80g", 64, 8192, 1, LLAMA3_8B, SELECTIVE_OP, 2973, 0.582),
    anchor("tt-l3-70b-full", "calibration", TORCHTITAN, "a100-80g", 64, 8192, 1, LLAMA3_70B, FULL_AC, 331, 0.517),
    anchor("tt-l2-13b-noac", "calibration", TORCHTITAN, "a100-80g", 64, 4096, 2, LLAMA2_13B, NO_AC, 2162, 0.611),
    # --- calibration of H100 against A100: MPT-7B at 2048 tokens on 8 GPUs, no recomputation --------------
    anchor("mpt-7b-a100", "ratio", MOSAIC, "a100-80g", 8, 2048, 6, MPT_7B, NO_AC, 4641, 0.6423,
           "micro-batch 6, 2 accumulated"),
    anchor("mpt-7b-h100", "ratio", MOSAIC, "h100-sxm", 8, 2048, 6, MPT_7B, NO_AC, 10643, 0.4644,
           "micro-batch 6, 1 accumulated"),
    # --- check: never fitted ----------------------------------------------------------------------------
    anchor("tt-l3-8b-sellayer", "check", TORCHTITAN, "a100-80g", 64, 8192, 1, LLAMA3_8B, SELECTIVE_LAYER, 2904, 0.568),
    anchor("tt-l2-13b-sellayer", "check", TORCHTITAN, "a100-80g", 64, 4096, 2, LLAMA2_13B, SELECTIVE_LAYER, 1914, 0.541),
    anchor("tt-l2-13b-selop", "check", TORCHTITAN, "a100-80g", 64, 4096, 2, LLAMA2_13B, SELECTIVE_OP, 1904, 0.538),
    anchor("tt-l2-70b-selop", "check", TORCHTITAN, "a100-80g", 64, 4096, 1, LLAMA2_70B, SELECTIVE_OP, 355, 0.508),
    anchor("tt-l2-70b-full", "check", TORCHTITAN, "a100-80g", 64, 4096, 2, LLAMA2_70B, FULL_AC, 353, 0.505),
    anchor("mpt-7b-4k-h100", "check", MOSAIC, "h100-sxm", 8, 4096, 16, MPT_7B, FULL_AC, 8611, 0.4042,
           "micro-batch 16, 2 accumulated"),
    anchor("mpt-70b-h100", "check", MOSAIC, "h100-sxm", 64, 2048, 8, MPT_70B, FULL_AC, 1039, 0.4257,
           "micro-batch 8, 4 accumulated"),
    anchor("mpt-70b-a100", "check", MOSAIC, "a100-80g", 64, 2048, 8, MPT_70B, FULL_AC, 410, 0.5333,
           "micro-batch 8, 4 accumulated; pure bf16 parameters"),
    anchor("tt-l31-405b-tp8", "check", TORCHTITAN_H100, "h100-sxm", 128, 8192, 2, LLAMA31_405B, FULL_AC, 109, 0.290,
           "FSDP 16 x TP 8; lower-TDP HBM2e H100s, MFU against the SXM peak as published", tp=8),
]  # fmt: skip


def config(a: dict) -> dict:
    dp = a["gpus"] // a["tp"]
    return {**a["model"], **a["policy"], "workload.seq_len": a["seq"], "workload.batch_size": a["local_batch"] * dp,
            "workload.dtype": "bf16", "parallel.fsdp": dp, "parallel.tp": a["tp"], "measure.hardware": a["hardware"],
            "measure.device": "auto"}  # fmt: skip


def traced(a: dict, cache: Path) -> dict:
    """The anchor's step trace (cached by its config), its model FLOPs per token and tokens per step."""
    from txlab.config import load_config
    from txlab.timemodel.predict import Work
    from txlab.timemodel.trace import Op
    from txlab.trial.build import training_facts
    from txlab.trial.predict import traced_step_memory, work_of
    from txlab.trial.resolve import resolve

    over = config(a)
    key = hashlib.sha256(json.dumps(over, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"{a['id']}-{key}.json"  # JSON, not pickle: nothing this repository reads can run code
    if path.exists():
        saved = json.loads(path.read_text())
        ops = [Op(**{**o, "dims": tuple(o["dims"]), "group": tuple(o["group"])}) for o in saved["ops"]]
        return {**saved, "ops": ops, "work": Work(**saved["work"])}
    t0 = time.perf_counter()
    setup = resolve(load_config(None, over), estimate=True)
    memory, model, ops = traced_step_memory(setup)
    facts = training_facts(setup, model, None)
    out = {
        "ops": ops,
        "work": work_of(setup, facts),
        "peak_bytes": memory.peak_bytes,
        "trace_s": time.perf_counter() - t0,
    }
    path.write_text(
        json.dumps({**out, "ops": [dataclasses.asdict(o) for o in ops], "work": dataclasses.asdict(out["work"])})
    )
    return out


def predict(a: dict, t: dict, efficiency=None) -> dict:
    from txlab.hardware import load_profile
    from txlab.timemodel.predict import prediction, timeline

    profile = load_profile(a["hardware"])
    if efficiency is not None:
        profile = dataclasses.replace(profile, efficiency=efficiency)
    line = timeline(t["ops"], profile, t["work"])
    p = prediction(line, profile, t["work"])
    return {"tokens_per_gpu": p.predicted_tokens_per_s / a["gpus"], "mfu": p.predicted_mfu, "step_s": line.step_s,
            "exposed_comm_s": line.exposed_comm_s, "compute_s": line.compute_s, "by_class": line.by_class}  # fmt: skip


def log_error(a, t, eff) -> float:
    return math.log(predict(a, t, eff)["tokens_per_gpu"] / a["published_tokens_per_gpu"])


def fit(anchors, traces, base):
    """Step 1 (ampere: matmul and attention efficiencies) and step 2 (the hopper factor); coarse-to-fine grid."""
    cal = [(a, traces[a["id"]]) for a in anchors if a["role"] == "calibration"]

    def loss(mm, at):
        e = dataclasses.replace(base, matmul=mm, attention=at)
        return sum(log_error(a, t, e) ** 2 for a, t in cal)

    best = min((loss(mm / 100, at / 100), mm / 100, at / 100) for mm in range(40, 100, 5) for at in range(20, 100, 5))
    for step in (0.01, 0.0025):
        _, mm0, at0 = best
        grid = [(mm0 + i * step, at0 + j * step) for i in range(-4, 5) for j in range(-4, 5)]
        best = min([best] + [(loss(mm, at), mm, at) for mm, at in grid if 0 < mm <= 1 and 0 < at <= 1])
    _, mm, at = best
    ampere = dataclasses.replace(base, matmul=round(mm, 4), attention=round(at, 4))
    (a100, t100), (h100, t_h) = [(a, traces[a["id"]]) for a in anchors if a["role"] == "ratio"]
    target = math.log(h100["published_tokens_per_gpu"] / a100["published_tokens_per_gpu"])
    ratio_a100 = predict(a100, t100, ampere)["tokens_per_gpu"]

    def ratio_error(f):
        e = dataclasses.replace(ampere, matmul=ampere.matmul * f, attention=ampere.attention * f)
        return (math.log(predict(h100, t_h, e)["tokens_per_gpu"] / ratio_a100) - target) ** 2

    f = min((ratio_error(x / 200), x / 200) for x in range(60, 201))[1]
    f = min((ratio_error(f + i / 2000), f + i / 2000) for i in range(-10, 11))[1]
    hopper = dataclasses.replace(ampere, matmul=round(ampere.matmul * f, 4), attention=round(ampere.attention * f, 4))
    return ampere, hopper, f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fit", action="store_true", help="fit the efficiencies to the calibration anchors and print them")
    p.add_argument("--only", nargs="*", help="anchor ids")
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "time_model_anchors"))
    args = p.parse_args()
    out = Path(args.out)
    (out / "traces").mkdir(parents=True, exist_ok=True)
    print(C.machine_line())
    anchors = [a for a in ANCHORS if not args.only or a["id"] in args.only]
    traces = {}
    for a in anchors:
        t0 = time.perf_counter()
        traces[a["id"]] = traced(a, out / "traces")
        print(
            f"  traced {a['id']:20s} {len(traces[a['id']]['ops']):6d} operators in {time.perf_counter() - t0:5.1f} s",
            flush=True,
        )
    from txlab.hardware.efficiency import FAMILIES, FAMILY_OF

    if args.fit:
        ampere, hopper, factor = fit(anchors, traces, FAMILIES["ampere"])
        print(f"fitted ampere: {ampere}")
        print(f"fitted hopper: factor {factor:.4f} -> {hopper}")
        FAMILIES["ampere"], FAMILIES["hopper"] = ampere, hopper
    rows = []
    for a in anchors:
        eff = FAMILIES[FAMILY_OF[a["hardware"]]]
        pr = predict(a, traces[a["id"]], eff)
        rows.append({**{k: v for k, v in a.items() if k not in ("model", "policy")},
                     "predicted_tokens_per_gpu": pr["tokens_per_gpu"], "predicted_mfu": pr["mfu"],
                     "error": pr["tokens_per_gpu"] / a["published_tokens_per_gpu"] - 1,
                     "step_s": pr["step_s"], "exposed_comm_s": pr["exposed_comm_s"],
                     "compute_share": {k: v / pr["compute_s"] for k, v in pr["by_class"].items() if k != "collective"}})  # fmt: skip
    print()
    print(f"{'anchor':20s} {'set':11s} {'GPU':9s} {'GPUs':>4s} {'published':>9s} {'predicted':>9s} {'error':>6s} "
          f"{'MFU pub':>7s} {'MFU pred':>8s} {'exposed comm':>12s}")  # fmt: skip
    for r in rows:
        print(f"{r['id']:20s} {r['role']:11s} {r['hardware']:9s} {r['gpus']:4d} {r['published_tokens_per_gpu']:9,.0f} "
              f"{r['predicted_tokens_per_gpu']:9,.0f} {r['error']:+6.0%} {r['published_mfu']:7.1%} "
              f"{r['predicted_mfu']:8.1%} {r['exposed_comm_s'] / r['step_s']:11.0%}")  # fmt: skip
    for role in ("calibration", "ratio", "check"):
        errs = [abs(r["error"]) for r in rows if r["role"] == role]
        if errs:
            print(
                f"{role:11s}: median |error| {sorted(errs)[len(errs) // 2]:.0%}, worst {max(errs):.0%} ({len(errs)} anchors)"
            )
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame["compute_share"] = frame["compute_share"].map(json.dumps)
    frame.to_parquet(out / "anchors.parquet", index=False)
    print(f"wrote {out / 'anchors.parquet'}")


if __name__ == "__main__":
    main()
