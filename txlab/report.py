"""Human-readable summary of one result row (what `txlab run` prints)."""

from __future__ import annotations

from typing import Any

GiB = 2**30


def _gib(v: int | None) -> str:
    return "-" if v is None else f"{v / GiB:.3f}"


def format_row(row: dict[str, Any]) -> str:
    policy = row["policy.name"]
    detail = [f"attention {row['policy.attention']}"]
    if row["policy.attention"] == "chunked":
        detail[-1] += f" {row['policy.q_chunk']}x{row['policy.k_chunk']}"
    detail.append(f"remat {row['policy.remat']}" + (f"/{row['policy.remat_every']}" if row["policy.remat"] == "every" else ""))
    detail.append(f"loss {row['policy.loss']}" + (f" {row['policy.loss_chunk']}" if row["policy.loss"] == "chunked" else ""))
    n_params = row.get("n_params")
    params = f", {n_params / 1e6:.1f}M params" if n_params else ""
    lines = [
        f"trial {row['trial_key']}  status {row['status']}  device {row['device']}",
        f"model     {row['model.size']}: {row['model.n_layers']} x {row['model.d_model']}, {row['model.n_heads']} heads"
        f" ({row['model.n_kv_heads']} kv), vocab {row['model.vocab_size']}{params}",
        f"policy    {policy} ({', '.join(detail)})",
        f"workload  {row['workload.kind']}  seq_len {row['workload.seq_len']}  batch {row['workload.batch_size']}  {row['workload.dtype']}",
    ]
    if row.get("plan"):
        lines.append(f"plan      {row['plan']}")
    if row.get("error"):
        lines.append(f"error     {row['error']}")
    if row.get("peak_bytes") is not None:
        budget = row.get("measure.budget_gib")
        lines.append(
            f"peak      {_gib(row['peak_bytes'])} GiB (GiB = 2^30 bytes)" + (f"  budget {budget:g} GiB" if budget else "")
        )
    if row.get("params_bytes") is not None:
        lines.append(
            "  at peak: params {}  grads {}  optimizer {}  activations {}  other {}  GiB".format(
                *(_gib(row[k]) for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes"))
            )
        )
    if row.get("reserved_bytes") is not None:
        lines.append(f"  allocator reserved {_gib(row['reserved_bytes'])} GiB")
    if row.get("peak_rss_bytes") is not None:
        lines.append(f"  resident set high-water mark above baseline {_gib(row['peak_rss_bytes'])} GiB (check on the tracker)")
    if row.get("step_time_s") is not None:
        mfu = f"  MFU {row['mfu']:.1%}" if row.get("mfu") is not None else ""
        lines.append(
            f"step      {row['step_time_s']:.4f} s (median of {row['workload.steps']})  "
            f"{row['tokens_per_s']:.0f} tokens/s{mfu}  loss {row['loss']:.4f}"
        )
    lines.append(f"took      {row['duration_s']:.1f} s")
    return "\n".join(lines)
