"""Human-readable summary of one result row (what `txlab run` prints)."""

from __future__ import annotations

from typing import Any

from txlab.results.columns import FIGURES
from txlab.units import GiB

# the bytes one device sends per step in each kind of collective (txlab.timemodel.trace.traffic), and the part of
# them that is context parallelism's K/V exchange
KV_EXCHANGE_COLUMN = "comm_kv_exchange_bytes"
TRAFFIC_COLUMNS = [
    c for c in FIGURES if c.startswith("comm_") and c.endswith("_bytes") and c not in ("comm_bytes", KV_EXCHANGE_COLUMN)
]


def _gib(v: int | None) -> str:
    return "-" if v is None else f"{v / GiB:.3f}"


def format_row(row: dict[str, Any]) -> str:
    policy = row["policy.name"]
    detail = [f"attention {row['policy.attention']}"]
    if row["policy.attention"] == "chunked":
        detail[-1] += f" {row['policy.q_chunk']}x{row['policy.k_chunk']}"
    if row.get("workload.kind") in ("prefill", "decode"):  # no backward, last position's logits only
        detail.append(
            f"kv {row['policy.kv']}"
            + (f" (tiles of {row['policy.k_chunk']})" if row["policy.kv"] == "recompute" else "")
        )
    else:
        detail.append(
            f"remat {row['policy.remat']}" + (f"/{row['policy.remat_every']}" if row["policy.remat"] == "every" else "")
        )
        detail.append(
            f"loss {row['policy.loss']}" + (f" {row['policy.loss_chunk']}" if row["policy.loss"] == "chunked" else "")
        )
    n_params = row.get("n_params")
    params = f", {n_params / 1e6:.1f}M params" if n_params else ""
    active = row.get("n_active_params")
    if n_params and active and active != n_params:  # a mixture of experts: what a token uses
        params += (
            f" ({active / 1e6:.1f}M active, {row.get('model.moe_top_k')} of {row.get('model.moe_experts')} experts)"
        )
    lines = [
        f"trial {row['trial_key']}  status {row['status']}  device {row['device']}",
        f"model     {row['model.size']}: {row['model.n_layers']} x {row['model.d_model']}, {row['model.n_heads']} heads"
        f" ({row['model.n_kv_heads']} kv), vocab {row['model.vocab_size']}{params}",
        f"policy    {policy} ({', '.join(detail)})",
        f"workload  {row['workload.kind']}  seq_len {row['workload.seq_len']}  batch {row['workload.batch_size']}  {row['workload.dtype']}",
    ]
    if (row.get("parallel.fsdp") or 1) > 1:
        lines.append(
            f"parallel  FSDP over {row['parallel.fsdp']} ranks (reshard after forward: "
            f"{str(row.get('parallel.reshard_after_forward')).lower()}); peak and breakdown: the largest rank's"
        )
    if (cp := row.get("parallel.cp") or 1) > 1:
        lines.append(
            f"parallel  CP over {cp} ranks: the sequence in {2 * cp} chunks, rank i holds chunks i and {2 * cp - 1}-i"
        )
    if (tp := row.get("parallel.tp") or 1) > 1:
        sp = "sequence parallel" if row.get("parallel.sequence_parallel") else "no sequence parallelism"
        lines.append(f"parallel  TP over {tp} ranks ({sp}): heads, MLP width and vocabulary split")
    if (ep := row.get("parallel.ep") or 1) > 1:
        E = row.get("model.moe_experts")
        lines.append(f"parallel  EP over {ep} of those ranks: {E // ep} of the {E} experts of a layer each, FSDP over "
                     f"the other {row['parallel.fsdp'] // ep}")  # fmt: skip
    if row.get("routing") == "measured":
        aux = row.get("aux_loss")
        lines.append(f"routing   load {row['routing_load']:.3f} (busiest expert over the mean, worst layer)"
                     + (f"  aux loss {aux:.4f} (not in loss)" if aux is not None else ""))  # fmt: skip
    elif row.get("routing"):
        lines.append(f"routing   assumed {row['routing']} (workload.routing_imbalance; fake tensors do not route)")
    if row.get("plan"):
        lines.append(f"plan      {row['plan']}")
    if row.get("error"):
        lines.append(f"error     {row['error']}")
    if row.get("peak_bytes") is not None:
        budget = row.get("measure.budget_gib")
        lines.append(
            f"peak      {_gib(row['peak_bytes'])} GiB (GiB = 2^30 bytes)"
            + (f"  budget {budget:g} GiB" if budget else "")
        )
    if row.get("params_bytes") is not None and row.get("workload.kind") in ("prefill", "decode"):
        lines.append(
            "  at peak: weights {}  KV cache {}  activations {}  other {}  GiB".format(
                *(_gib(row[k]) for k in ("params_bytes", "kv_cache_bytes", "activations_bytes", "other_bytes"))
            )
        )
    elif row.get("params_bytes") is not None:
        lines.append(
            "  at peak: params {}  grads {}  optimizer {}  activations {}  other {}  GiB".format(
                *(
                    _gib(row[k])
                    for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes")
                )
            )
        )
    if row.get("gathered_params_bytes") is not None:
        spread = row.get("peak_spread_bytes")
        lines.append(
            f"           gathered params {_gib(row['gathered_params_bytes'])}  communication buffers "
            f"{_gib(row['comm_bytes'])} GiB (with the five above: the peak)"
            + (f"; ranks' peaks within {_gib(spread)} GiB" if spread is not None else "")
        )
    if row.get("reserved_bytes") is not None:
        lines.append(f"  allocator reserved {_gib(row['reserved_bytes'])} GiB")
    if row.get("peak_rss_bytes") is not None:
        lines.append(
            f"  resident set high-water mark above baseline {_gib(row['peak_rss_bytes'])} GiB (check on the tracker)"
        )
    if row.get("workload.kind") in ("prefill", "decode"):
        lines += _inference_lines(row)
    elif row.get("step_time_s") is not None:
        mfu = f"  MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
        lines.append(
            f"step      {row['step_time_s']:.4f} s (median of {row['workload.steps']})  "
            f"{row['tokens_per_s']:.0f} tokens/s{mfu}  loss {row['loss']:.4f}"
        )
        if row.get("compile_s") is not None:
            lines.append(
                f"compile   {row['compile_s']:.1f} s (the compiling first step, less one step; not in the step time)"
            )
    if row.get("predicted_step_time_s") is not None:
        lines.append(time_line(row))
    sent = {c.removeprefix("comm_").removesuffix("_bytes").replace("_", "-"): row.get(c) for c in TRAFFIC_COLUMNS}
    if any(sent.values()):  # a layout that communicates (one device sends nothing: no line)
        kv = row.get(KV_EXCHANGE_COLUMN)
        lines.append("comm      sent per device per step (traced): "
                     + ", ".join(f"{k} {_gib(v)} GiB" for k, v in sent.items() if v)
                     + (f" (of these, CP's K/V exchange {_gib(kv)} GiB)" if kv else ""))  # fmt: skip
    lines.append(f"took      {row['duration_s']:.1f} s")
    return "\n".join(lines)


def time_line(row: dict[str, Any]) -> str:
    """The time model's figures (predicted on `row['hardware']`), one line: step, tokens/s, MFU, comm, $."""
    devices = (row.get("parallel.fsdp") or 1) * (row.get("parallel.cp") or 1) * (row.get("parallel.tp") or 1)
    total = row["predicted_tokens_per_s"]
    mfu = row.get("predicted_mfu")
    usd = row.get("predicted_usd_per_mtok")
    return (
        f"time      predicted on {row['hardware']}: step {row['predicted_step_time_s']:.4g} s, "
        f"{total / devices:,.0f} tokens/s per device"
        + (f" ({total:,.0f} on all {devices})" if devices > 1 else "")
        + (f", MFU {mfu:.1%}" if mfu is not None else "")
        + f", exposed comm {row['predicted_exposed_comm_s']:.3g} s, "
        + (f"${usd:.4g} per million tokens" if usd is not None else "$ -: no price (measure.usd_per_device_hour)")
    )


def _inference_lines(row: dict[str, Any]) -> list[str]:
    """prefill / decode rows: KV policy, times per token, int4 figures."""
    out = []
    kv = row.get("kv_cache_bytes")
    if kv is not None:
        detail = f"K/V held {_gib(kv)} GiB"
        if row.get("kv_inputs_bytes") is not None:
            detail += f", layer inputs kept {_gib(row['kv_inputs_bytes'])} GiB"
        out.append(f"kv        {detail}")
    if row.get("prefill_time_s") is not None:
        mfu = f"  MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
        out.append(
            f"prefill   {row['prefill_time_s']:.4f} s (median of {row['workload.steps']})"
            + (f"  {row['tokens_per_s']:.0f} tokens/s{mfu}" if row["workload.kind"] == "prefill" else "")
        )
    if row.get("time_per_token_s") is not None:
        out.append(
            f"decode    {row['workload.decode_tokens']} tokens: {row['time_per_token_s']:.4f} s/token (median)  "
            f"{row['tokens_per_s']:.1f} tokens/s"
        )
    if row.get("model.quant") == "int4" and row.get("weight_bytes") is not None:
        line = (
            f"int4      weights {_gib(row['weight_bytes_fp'])} -> {_gib(row['weight_bytes'])} GiB "
            f"(group {row['model.quant_group']})"
        )
        if row.get("logit_rel_error") is not None:
            line += (
                f"  logit relative error {row['logit_rel_error']:.4f}  next-token agreement "
                f"{row['next_token_agreement']:.1%}"
            )
        out.append(line)
    return out
