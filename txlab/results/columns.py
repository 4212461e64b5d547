"""Result-row columns: the contract between trials, the store and analysis (docs/design.md, "Result row").

Analysis may import this module and `txlab.results.store`, nothing else from txlab.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from typing import Literal, get_args, get_origin

import pyarrow as pa

from txlab.units import GiB  # noqa: F401 - the analysis reads the unit of the byte columns from here

SCHEMA_VERSION = 13
# Every row schema version and its migration note. Any change to the row's columns (one added, removed,
# renamed or retyped; config keys included, since every config key is a column) bumps SCHEMA_VERSION and
# adds a line here saying what changed and how rows of the version before read under it. Added columns
# need no migration: older rows read them as null (txlab.results.store reads every file into today's
# schema). Renamed or retyped columns need a conversion in the store's reader before the bump ships.
# tests/test_store_versions.py pins each version's columns, so a change without a bump fails there.
SCHEMA_HISTORY: dict[int, str] = {
    1: "txlab 0.1: the first released row (identity, config and figure columns); "
    "tests/fixtures/store_v0_1_smoke holds a store of it",
    2: "txlab 0.2: config columns of real architectures (model.hf, init, head_dim, mlp_hidden, norm_eps, "
    "attn_bias, attn_out_bias, mlp_bias, qk_norm, rope_theta, rope_scaling, rope_factor, rope_low_freq_factor, "
    "rope_high_freq_factor, rope_original_len) and sharded trials (parallel.fsdp, parallel.reshard_after_forward; "
    "figures gathered_params_bytes, comm_bytes, peak_spread_bytes), and compiled trials' compile_s; no "
    "migration: version-1 rows read them as null, which for a config key means its declared default (the 0.1 "
    "model, one device)",
    3: "txlab 0.2: config column policy.selective_save (what selective runs keep); no migration: older rows "
    "read it as its declared default, txlab (the only save list before it)",
    4: "txlab 0.3: identity column threads (the CPU threads torch ran the trial's steps with; a sweep's trials "
    "run with their resources' CPUs, txlab run with torch's default); no migration: older rows read it as "
    "null, unknown (txlab rerun then says it cannot match them)",
    5: "txlab 0.3: the time model (issue 24): config columns measure.hardware, measure.usd_per_device_hour and "
    "figures hardware, predicted_step_time_s, predicted_tokens_per_s, predicted_mfu, predicted_exposed_comm_s, "
    "predicted_usd_per_mtok; no migration: older rows read them as null (no profile: no prediction; for the "
    "config keys their declared defaults)",
    6: "txlab 0.3: config columns parallel.tp and parallel.sequence_parallel (tensor-parallel layouts); no "
    "migration: older rows read them as their declared defaults, 1 and true (no tensor parallelism)",
    7: "txlab 0.3: config column workload.grad_accum (micro-steps per optimizer step); no migration: older rows "
    "read it as its declared default, 1 (no accumulation, the only step before it)",
    8: "txlab 0.3: mixture-of-experts models (issue 25): config columns model.moe_experts, moe_top_k, moe_hidden, "
    "moe_shared, moe_router, moe_renorm, moe_groups, moe_topk_groups, moe_scale, moe_first_dense, moe_every, "
    "moe_dense_layers, qk_norm_scope, attn, mla_q_rank, mla_kv_rank, mla_nope_dim, mla_rope_dim, mla_v_dim, "
    "rope_beta_fast, rope_beta_slow, rope_mscale, rope_mscale_all_dim (and the values moe of model.mlp, yarn of "
    "model.rope_scaling) and figure n_active_params; no migration: older rows read them as null, which for a "
    "config key means its declared default (a dense model, mha attention), and n_active_params null (unknown; "
    "for a dense row it equals n_params)",
    9: "txlab 0.3: mixture-of-experts routing figures (issue 25): routing (how the row's routing is known: "
    "measured, or an estimate's assumption), routing_load, aux_loss; no migration: older rows read them as null "
    "(not recorded)",
    10: "txlab 0.3: communication columns (issues 23, 24): comm_all_gather_bytes, comm_reduce_scatter_bytes, "
    "comm_all_reduce_bytes, comm_all_to_all_bytes, the bytes one device sends per step in each kind of "
    "collective, counted on the step's operator trace; no migration: older rows read them as null (not traced)",
    11: "txlab 0.3: expert parallelism (issue 25): config columns parallel.ep (expert-parallel ranks drawn from the "
    "fsdp ranks) and workload.routing_imbalance (an estimate's routing assumption); no migration: older rows read "
    "them as their declared defaults, 1 and 1.0 (no expert parallelism; balanced, which no older row assumed: "
    "none estimated an expert-parallel layout)",
    12: "txlab 0.3: config column parallel.cp (context-parallel layouts, issue 23); no migration: older rows read it "
    "as its declared default, 1 (no context parallelism)",
    13: "txlab 0.3: figure comm_kv_exchange_bytes (issue 23): of the all-gather and reduce-scatter bytes, those of "
    "context parallelism's K/V exchange (included in comm_all_gather_bytes and comm_reduce_scatter_bytes, not "
    "beside them); no migration: older rows read it as null (not counted)",
}

STATUSES = ("ok", "oom", "over_budget", "error")
# Statuses that are final: a resumed sweep skips these trial keys (errors are rerun on request).
FINAL_STATUSES = ("ok", "oom", "over_budget")

IDENTITY: dict[str, pa.DataType] = {
    "trial_key": pa.string(),  # stable hash of the resolved config
    "sweep": pa.string(),  # sweep name, null for a lone `txlab run`
    "status": pa.string(),  # ok | oom | over_budget | error
    "error": pa.string(),  # message when status != ok
    "started_at": pa.string(),  # ISO 8601, UTC
    "duration_s": pa.float64(),  # wall time of the whole trial (build + steps + measurement)
    "host": pa.string(),
    "node_id": pa.string(),  # Ray node id when run by a sweep
    "device": pa.string(),  # "cpu" or the CUDA device name
    "device_capacity_bytes": pa.int64(),  # RAM (CPU) or device memory (CUDA)
    "torch_version": pa.string(),
    "txlab_version": pa.string(),
    "measured": pa.bool_(),  # true: figures from a run; false: an estimate
    "threads": pa.int64(),  # torch's CPU threads in the process that ran the steps (null: an estimate, or unknown)
}

FIGURES: dict[str, pa.DataType] = {
    "peak_bytes": pa.int64(),  # CUDA: allocator peak; CPU: live-tensor tracker peak
    "params_bytes": pa.int64(),  # breakdown at the peak ...
    "grads_bytes": pa.int64(),
    "optimizer_bytes": pa.int64(),
    "activations_bytes": pa.int64(),
    "other_bytes": pa.int64(),  # ... the rest: backward temporaries, inputs, allocator slack
    "tracked_peak_bytes": pa.int64(),  # the tensor tracker's peak (equals peak_bytes on CPU)
    "reserved_bytes": pa.int64(),  # CUDA caching allocator's reserved peak
    "gathered_params_bytes": pa.int64(),  # parallel.fsdp > 1: a breakdown column (gathered parameters in flight)
    "comm_bytes": pa.int64(),  # parallel.fsdp > 1: a breakdown column (all-gather / reduce-scatter buffers)
    "peak_spread_bytes": pa.int64(),  # parallel.fsdp > 1: largest minus smallest rank's peak (peak_bytes is the largest)
    "peak_rss_bytes": pa.int64(),  # CPU: resident high-water mark above the pre-trial baseline
    "n_params": pa.int64(),
    "n_active_params": pa.int64(),  # parameters one token uses (mixture of experts: k of E routed experts; dense: all)
    "step_time_s": pa.float64(),  # median of timed steps
    "compile_s": pa.float64(),  # workload.compile: the compiling first step's time less step_time_s
    "tokens_per_s": pa.float64(),
    "flops_per_token": pa.float64(),  # analytic, training (6N + 12 L H Q T)
    "mfu": pa.float64(),  # CUDA only: achieved / peak FLOP/s of the device
    "loss": pa.float64(),  # last timed step's training loss (nats/token): the language-model loss alone
    # mixture of experts (null on dense rows): the routing of the last timed step's last forward, global batch
    "routing": pa.string(),  # measured, or an estimate's assumption: balanced | imbalance F (workload.routing_imbalance)
    "routing_load": pa.float64(),  # busiest expert's (token, expert) pairs over the mean, the largest over layers
    "aux_loss": pa.float64(),  # load-balancing loss (transformers' aux_loss; softmax routers), not in `loss`
    "bits_per_byte": pa.float64(),  # when the data maps tokens to bytes
    "formula_activation_bytes": pa.int64(),  # closed form of Korthikanti et al. 2022 (txlab.measure.formula)
    "plan": pa.string(),  # policy.remat=planned: the runs chosen, predicted peak and recompute cost (txlab.policy.planner)
    # prefill / decode (txlab.trial.infer); null on training rows
    "kv_cache_bytes": pa.int64(),  # K/V held between steps, in the peak (a breakdown column: taken out of activations)
    "kv_inputs_bytes": pa.int64(),  # policy.kv=recompute: layer inputs kept to recompute K/V from (part of activations)
    "prefill_time_s": pa.float64(),  # median time of the prefill forward over seq_len tokens
    "time_per_token_s": pa.float64(),  # decode: median time of one generated token (step_time_s too)
    "weight_bytes": pa.int64(),  # model weights as held (int4: packed projections + fp16 scales)
    "weight_bytes_fp": pa.int64(),  # the same weights at full precision
    "logit_rel_error": pa.float64(),  # int4: ||logits - full-precision logits|| / ||full-precision logits||, over the prompt
    "next_token_agreement": pa.float64(),  # int4: share of prompt positions whose argmax matches full precision
    # the time model (txlab.timemodel) on a hardware profile: predictions, never mixed with the measured figures
    "hardware": pa.string(),  # the profile predicted for (measure.hardware, or local for a measured row)
    "predicted_step_time_s": pa.float64(),
    "predicted_tokens_per_s": pa.float64(),  # all devices together
    "predicted_mfu": pa.float64(),  # analytic FLOPs per token x predicted tokens/s over devices x dense peak
    "predicted_exposed_comm_s": pa.float64(),  # communication not hidden behind compute, per step
    "predicted_usd_per_mtok": pa.float64(),  # with measure.usd_per_device_hour: dollars per million tokens
    # bytes one device sends per optimizer step, by collective, counted on the step's operator trace (estimates;
    # measured rows with a profile): what the time model prices (txlab.timemodel.trace.traffic)
    "comm_all_gather_bytes": pa.int64(),
    "comm_reduce_scatter_bytes": pa.int64(),
    "comm_all_reduce_bytes": pa.int64(),
    "comm_all_to_all_bytes": pa.int64(),
    "comm_kv_exchange_bytes": pa.int64(),  # of comm_all_gather/reduce_scatter_bytes: CP's K/V and dK/dV
}


def _arrow_type(annotation) -> pa.DataType:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # Optional[X] and X | None
        return _arrow_type([a for a in get_args(annotation) if a is not type(None)][0])
    if origin is Literal or annotation is str:
        return pa.string()
    if annotation is bool:
        return pa.bool_()
    if annotation is int:
        return pa.int64()
    if annotation is float:
        return pa.float64()
    raise TypeError(f"no Arrow type for {annotation!r}")


def config_columns() -> dict[str, pa.DataType]:
    """Every config key as a dotted column, typed from the config dataclasses."""
    from txlab.config import SECTIONS, TrialConfig

    out: dict[str, pa.DataType] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            out[f"{section}.{f.name}"] = _arrow_type(hints[f.name])
    hints = typing.get_type_hints(TrialConfig)
    for f in fields(TrialConfig):
        if f.name not in SECTIONS:
            out[f.name] = _arrow_type(hints[f.name])
    return out


def added_defaults() -> dict[str, object]:
    """Config columns added after 0.1 (`SINCE` keys) with a non-null default: rows written before a key
    existed hold null there, and that null means the default (the key's default reproduces the old model)."""
    from txlab.config import SECTIONS
    from txlab.config.identity import SINCE, declared_default

    return {
        f"{section}.{f.name}": declared_default(f)
        for section, cls in SECTIONS.items()
        for f in fields(cls)
        if f.metadata.get(SINCE) and declared_default(f) is not None
    }


def row_schema() -> pa.Schema:
    cols = {**IDENTITY, **config_columns(), **FIGURES}
    return pa.schema(list(cols.items()), metadata={"txlab.schema_version": str(SCHEMA_VERSION)})


def column_names() -> list[str]:
    return row_schema().names
