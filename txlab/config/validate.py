"""Cross-field checks of a built config, one function per section, run in `TrialConfig.__post_init__`.

Each failure is one line naming the key(s) and what is allowed (the CLI exits 2 on it). The functions take
the config (a `txlab.config.schema.TrialConfig`) untyped: the schema imports this module, so this module
does not import the schema.
"""

from __future__ import annotations

from typing import Any

from txlab.config.errors import ConfigError

# Not built yet: refused with a clear error instead of being silently ignored (none at the moment).
NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {}
# Names, or prefixes ending in ':' that take an argument (a path, a hub name).
DATA_SOURCES = ("synthetic", "corpus", "text:", "parquet:", "hf:")
TOKENIZERS = ("bytes", "hf:")
BYTE_VOCAB = 257  # the byte tokenizer's ids: 256 byte values + end-of-text


def _positive(key: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg) -> None:
    """Every cross-field check, section by section (the first failure is the one reported)."""
    _validate_model(cfg.model)
    _validate_moe(cfg.model, cfg.policy, cfg.parallel)
    _validate_workload(cfg.model, cfg.workload)
    _validate_accumulation(cfg.workload, cfg.policy, cfg.parallel)
    _validate_policy(cfg.model, cfg.policy, cfg.workload, cfg.measure)
    _validate_inference(cfg.model, cfg.policy, cfg.workload)
    _refuse_not_implemented(cfg)
    _validate_data(cfg.model, cfg.data)
    _validate_train(cfg.train)
    _validate_measure(cfg.measure)
    _validate_hardware(cfg.measure, cfg.workload)
    _validate_parallel(cfg.parallel, cfg.model, cfg.workload, cfg.policy, cfg.measure)
    _positive("seed", cfg.seed, allow_zero=True)


def _validate_model(m) -> None:
    for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "vocab_size", "quant_group"):
        _positive(f"model.{key}", getattr(m, key))
    for key in (
        "n_positions",
        "head_dim",
        "mlp_hidden",
        "norm_eps",
        "rope_theta",
        "rope_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_original_len",
        "rope_beta_fast",
        "rope_beta_slow",
    ):
        _positive(f"model.{key}", getattr(m, key))
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.n_heads: must divide model.d_model ({m.d_model} % {m.n_heads} != 0), or set model.head_dim"
        )
    if m.n_kv_heads > m.n_heads or m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads: must divide model.n_heads ({m.n_heads} % {m.n_kv_heads} != 0)"
            if m.n_kv_heads <= m.n_heads
            else f"model.n_kv_heads: must be <= model.n_heads ({m.n_kv_heads} > {m.n_heads})"
        )
    if m.pos == "rope" and m.rope_dim() % 2:
        raise ConfigError(f"model.pos: rope needs an even head dim (got {m.rope_dim()})")
    if m.pos != "rope" and (m.rope_scaling != "none" or m.rope_theta != 10000.0):
        raise ConfigError(
            "model.rope_theta / model.rope_scaling: apply to model.pos 'rope' only; leave them at "
            f"their defaults with model.pos {m.pos!r}"
        )
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        raise ConfigError(
            f"model.rope_high_freq_factor: must be above model.rope_low_freq_factor "
            f"({m.rope_high_freq_factor} <= {m.rope_low_freq_factor})"
        )
    if m.init == "pretrained" and m.hf is None:
        raise ConfigError("model.init: 'pretrained' loads the weights of model.hf; set model.hf to a checkpoint")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")


def _validate_accumulation(w, p, par) -> None:
    """workload.grad_accum splits each data-parallel rank's rows of the global batch into equal micro-batches."""
    _positive("workload.grad_accum", w.grad_accum)
    if w.grad_accum == 1:
        return
    if w.kind != "train":
        raise ConfigError(
            f"workload.grad_accum: accumulates training gradients; workload.kind {w.kind!r} has none (allowed: 1)"
        )
    if p.remat == "planned":
        raise ConfigError(
            "workload.grad_accum: the planner plans the step of the whole batch; use another policy.name with "
            "accumulation (allowed with planned: 1)"
        )
    share = w.batch_size // par.fsdp if w.batch_size % par.fsdp == 0 else None
    if share is not None and share % w.grad_accum:
        raise ConfigError(
            f"workload.grad_accum: {w.grad_accum} micro-batches must divide each data-parallel rank's "
            f"{share} sequences (workload.batch_size {w.batch_size} / parallel.fsdp {par.fsdp})"
        )


def _validate_workload(m, w) -> None:
    for key in ("seq_len", "batch_size", "steps", "decode_tokens"):
        _positive(f"workload.{key}", getattr(w, key))
    _positive("workload.warmup_steps", w.warmup_steps, allow_zero=True)
    if m.pos == "learned" and m.n_positions is not None and w.seq_len > m.n_positions:
        raise ConfigError(
            f"workload.seq_len: {w.seq_len} is over model.n_positions ({m.n_positions}); raise model.n_positions or leave it null"
        )


def _validate_policy(m, p, w, ms) -> None:
    for key in ("q_chunk", "k_chunk", "loss_chunk", "remat_every"):
        _positive(f"policy.{key}", getattr(p, key))
    if p.attention == "chunked":
        for key in ("q_chunk", "k_chunk"):
            if getattr(p, key) > w.seq_len:
                raise ConfigError(f"policy.{key}: {getattr(p, key)} is larger than workload.seq_len ({w.seq_len})")
    if p.loss == "chunked" and p.loss_chunk > w.seq_len:
        raise ConfigError(f"policy.loss_chunk: {p.loss_chunk} is larger than workload.seq_len ({w.seq_len})")
    if p.selective_save != "txlab" and p.remat not in ("selective", "planned"):
        raise ConfigError(
            f"policy.selective_save: {p.selective_save!r} says what a selective recomputation keeps, but "
            f"policy.remat is {p.remat!r}; allowed with remat selective or planned (else leave it txlab)"
        )
    if p.remat == "every" and p.remat_every > m.n_layers:
        raise ConfigError(f"policy.remat_every: {p.remat_every} is larger than model.n_layers ({m.n_layers})")
    if p.remat == "planned" and ms.budget_gib is None:
        raise ConfigError(
            "policy.remat: 'planned' chooses what to recompute for measure.budget_gib; set measure.budget_gib"
        )
    if p.kv == "grouped" and m.n_kv_heads == m.n_heads:
        raise ConfigError("policy.kv: 'grouped' needs model.n_kv_heads < model.n_heads")


def _refuse_not_implemented(cfg) -> None:
    for key, values in NOT_IMPLEMENTED.items():
        section, leaf = key.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if value in values:
            raise ConfigError(f"{key}: {value!r} is not implemented yet in this version of txlab")


def _validate_data(m, d) -> None:
    if not _gate_match(d.source, DATA_SOURCES):
        allowed = "synthetic, corpus, text:PATH, parquet:PATH, hf:NAME[:CONFIG]"
        raise ConfigError(f"data.source: unknown source {d.source!r}; allowed: {allowed}")
    if not _gate_match(d.tokenizer, TOKENIZERS):
        raise ConfigError(f"data.tokenizer: unknown tokenizer {d.tokenizer!r}; allowed: bytes, hf:NAME_OR_PATH")
    if d.tokenizer == "bytes" and d.source != "synthetic" and m.vocab_size < BYTE_VOCAB:
        raise ConfigError(
            f"model.vocab_size: {m.vocab_size} is too small for data.tokenizer 'bytes' on data.source "
            f"{d.source!r} ({BYTE_VOCAB} ids: 256 byte values + end-of-text); set model.vocab_size >= {BYTE_VOCAB}"
        )
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    _positive("data.workers", d.workers, allow_zero=True)


def _validate_train(t) -> None:
    for key in ("steps", "grad_accum", "eval_every", "eval_batches", "log_every"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("warmup", "hold", "decay", "checkpoint_every"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    for key in ("lr", "time_limit_s"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("min_lr", "weight_decay", "grad_clip"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr: {t.min_lr} is above train.lr ({t.lr})")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            raise ConfigError(f"train.{key}: must be in [0, 1), got {getattr(t, key)}")


def _validate_measure(ms) -> None:
    dev = ms.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"measure.device: unknown device {dev!r}; allowed: auto, cpu, cuda, cuda:N")
    _positive("measure.budget_gib", ms.budget_gib)


def _validate_hardware(ms, w) -> None:
    """measure.hardware: a profile that loads (a catalogue name, local, or a file, read and checked here), for
    training steps, with a peak for the workload's dtype; a price only with a profile, and not negative."""
    if ms.usd_per_device_hour is not None and not ms.usd_per_device_hour >= 0:
        raise ConfigError(
            f"measure.usd_per_device_hour: must be >= 0 (dollars per device-hour), got {ms.usd_per_device_hour}"
        )
    if ms.hardware is None:
        if ms.usd_per_device_hour is not None:
            raise ConfigError(
                "measure.usd_per_device_hour: prices the time predicted on measure.hardware; set measure.hardware "
                "(a profile name, local, or a YAML path) or leave the price null"
            )
        return
    if w.kind != "train":
        raise ConfigError(
            f"measure.hardware: the time model predicts training steps; workload.kind {w.kind!r} is not one "
            "(allowed with workload.kind train; leave measure.hardware null)"
        )
    from txlab.hardware import ProfileError, load_profile

    try:
        load_profile(ms.hardware).peak(w.dtype)
    except ProfileError as e:
        raise ConfigError(str(e)) from None


def _validate_inference(m, p, w) -> None:
    inference = w.kind in ("prefill", "decode")
    if m.quant == "int4":
        if not inference:
            raise ConfigError(
                f"model.quant: 'int4' is inference only (weight-only, no gradients); "
                f"allowed with workload.kind prefill or decode, got workload.kind {w.kind!r}"
            )
        widths = sorted({m.d_model, m.mlp_width()})
        if m.quant_group % 2 or any(x % m.quant_group for x in widths):
            raise ConfigError(
                f"model.quant_group: {m.quant_group} must be even and divide the projections' input "
                f"widths ({', '.join(map(str, widths))}), e.g. 64 or 128"
            )
    if not inference:
        if p.kv != "cache":
            raise ConfigError(
                f"policy.kv: {p.kv!r} applies to workload.kind prefill or decode; "
                f"with workload.kind {w.kind!r} leave it at 'cache'"
            )
        return
    if p.remat == "planned":
        raise ConfigError(
            f"policy.remat: 'planned' plans recomputation for training; "
            f"workload.kind {w.kind!r} runs no backward (use another policy.name)"
        )
    if w.compile:
        raise ConfigError(f"workload.compile: not supported for workload.kind {w.kind!r}; allowed: false")
    if (
        w.kind == "decode"
        and m.pos == "learned"
        and m.n_positions is not None
        and w.seq_len + w.decode_tokens > m.n_positions
    ):
        raise ConfigError(
            f"workload.decode_tokens: seq_len {w.seq_len} + decode_tokens {w.decode_tokens} is over model.n_positions "
            f"({m.n_positions}); raise model.n_positions or leave it null"
        )


def _gate_match(value: str, allowed: tuple[str, ...]) -> bool:
    """`value` is one of the names, or a prefix ending in ':' followed by a non-empty argument."""
    return any(value == a if not a.endswith(":") else (value.startswith(a) and len(value) > len(a)) for a in allowed)


def _validate_parallel(par, m, w, p, ms) -> None:
    _positive("parallel.fsdp", par.fsdp)
    _positive("parallel.tp", par.tp)
    _positive("parallel.cp", par.cp)
    _positive("parallel.ep", par.ep)
    _validate_imbalance(w.routing_imbalance, m)
    if par.ep > 1:
        _validate_ep(par, m)
    if par.tp == 1 and not par.sequence_parallel:
        raise ConfigError(
            "parallel.sequence_parallel: splits the sequence inside tensor-parallel regions, but parallel.tp is 1; "
            "leave it true with tp 1"
        )
    if par.cp > 1:  # before tp: tp's sequence check reads the CP rank's share of the sequence
        _validate_cp(par, w)
    if par.tp > 1:
        _validate_tp(par, m, w)
    world = par.fsdp * par.cp * par.tp
    if world == 1:
        return
    key = next(f"parallel.{k}" for k in ("fsdp", "cp", "tp") if getattr(par, k) > 1)  # the key a message names
    if w.batch_size % par.fsdp:
        raise ConfigError(
            f"parallel.fsdp: {par.fsdp} ranks must divide workload.batch_size (the global batch; "
            f"{w.batch_size} % {par.fsdp} != 0)"
        )
    if w.kind != "train":
        raise ConfigError(f"{key}: sharded trials train; workload.kind {w.kind!r} runs on one device (fsdp, cp, tp 1)")
    if p.remat == "planned":
        raise ConfigError(f"{key}: the planner plans one device's memory; use another policy.name with {world} ranks")
    if w.compile:
        raise ConfigError(f"workload.compile: not supported with {key} > 1 yet; allowed: false")
    if ms.device.startswith("cuda:"):  # rank r runs on cuda:r: one named GPU cannot hold the ranks
        raise ConfigError(
            f"measure.device: {ms.device!r} names one GPU, but the {world} ranks of {key} run on "
            f"cuda:0..{world - 1}; allowed with {world} ranks: auto, cpu, cuda (pick GPUs with CUDA_VISIBLE_DEVICES)"
        )


def _validate_cp(par, w) -> None:
    """Context parallelism cuts the sequence into 2 x cp equal chunks (rank i takes chunks i and 2cp-1-i:
    causal load balancing)."""
    if w.seq_len % (2 * par.cp):
        allowed = [1] + [d for d in range(2, w.seq_len // 2 + 1) if w.seq_len % (2 * d) == 0]
        raise ConfigError(
            f"parallel.cp: 2 x {par.cp} chunks must divide workload.seq_len ({w.seq_len} % {2 * par.cp} != 0: "
            f"causal load balancing gives each rank two equal chunks); allowed here: {', '.join(map(str, allowed[:8]))}"
        )


def _validate_imbalance(f: float, m) -> None:
    if f == 1.0:
        return
    if m.mlp != "moe":
        raise ConfigError(f"workload.routing_imbalance: {f} applies to model.mlp 'moe' only; allowed: 1.0")
    most = m.moe_experts / m.moe_top_k  # every token sent to the same k experts
    if not 1.0 <= f <= most:
        raise ConfigError(
            f"workload.routing_imbalance: {f} must be in 1.0..{most:g} (balanced .. every token to the same "
            f"model.moe_top_k of the model.moe_experts experts)"
        )


def _validate_ep(par, m) -> None:
    """Expert parallelism spreads each MoE layer's routed experts evenly over ep of the fsdp ranks."""
    if m.mlp != "moe":
        raise ConfigError(f"parallel.ep: {par.ep} spreads routed experts, but model.mlp is {m.mlp!r}; allowed: 1")
    for value, name in ((m.moe_experts, "model.moe_experts"), (par.fsdp, "parallel.fsdp")):
        if value % par.ep:
            allowed = [
                d for d in range(1, value + 1) if value % d == 0 and par.fsdp % d == 0 and m.moe_experts % d == 0
            ]
            raise ConfigError(
                f"parallel.ep: {par.ep} must divide {name} ({value} % {par.ep} != 0: expert-parallel ranks are drawn "
                f"from the fsdp ranks and hold equal shares of the experts); allowed here: {', '.join(map(str, allowed))}"
            )
    if par.cp > 1:
        raise ConfigError(f"parallel.ep: expert parallelism with parallel.cp {par.cp} is not built yet; allowed: 1")


def _validate_tp(par, m, w) -> None:
    """Tensor parallelism splits heads, KV heads and the MLP width (and with sequence parallelism the
    sequence) into equal whole parts, one per TP rank. KV heads are split, not replicated: tp above
    n_kv_heads is refused (GQA models with few KV heads take tp <= n_kv_heads)."""
    sizes = {"model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads, "MLP width": m.mlp_width()}
    if par.sequence_parallel:  # the sequence a rank holds: its CP share (two chunks) with cp > 1
        sizes["workload.seq_len" if par.cp == 1 else "workload.seq_len / parallel.cp"] = w.seq_len // par.cp
    allowed = [d for d in range(1, min(sizes.values()) + 1) if all(v % d == 0 for v in sizes.values())]
    for name, value in sizes.items():
        if value % par.tp:
            why = {
                "model.n_heads": "each rank takes whole heads",
                "model.n_kv_heads": "KV heads are split over the ranks, not replicated",
                "MLP width": "the MLP's hidden units are split evenly (model.mlp_hidden)",
                "workload.seq_len": "sequence parallelism splits the sequence evenly (or parallel.sequence_parallel: false)",
                "workload.seq_len / parallel.cp": "sequence parallelism splits a CP rank's share of the sequence "
                "evenly (or parallel.sequence_parallel: false)",
            }[name]
            raise ConfigError(
                f"parallel.tp: {par.tp} must divide {name} ({value} % {par.tp} != 0: {why}); "
                f"allowed here: {', '.join(map(str, allowed[:8]))}"
            )
    if m.dropout:
        raise ConfigError(
            f"model.dropout: {m.dropout} with parallel.tp > 1 is not built (each rank would draw its own masks); "
            "allowed with tp > 1: 0.0"
        )
    if m.qk_norm:
        raise ConfigError("model.qk_norm: not supported with parallel.tp > 1 yet; allowed: false, or parallel.tp 1")


# Mixture-of-experts and latent-attention keys, with the value that leaves them out (the dense 0.2 model).
MOE_DEFAULTS = {"moe_experts": None, "moe_top_k": None, "moe_hidden": None, "moe_shared": 0, "moe_router": "softmax",
                "moe_renorm": True, "moe_groups": 1, "moe_topk_groups": 1, "moe_scale": 1.0, "moe_first_dense": 0,
                "moe_every": 1, "moe_dense_layers": ""}  # fmt: skip
MLA_DEFAULTS = {"mla_q_rank": None, "mla_kv_rank": None, "mla_nope_dim": None, "mla_rope_dim": None, "mla_v_dim": None}


def _validate_moe(m, p, par) -> None:
    """model.mlp moe and model.attn mla: their keys, refused on models that do not use them."""
    if m.mlp != "moe":
        for key, default in MOE_DEFAULTS.items():
            if getattr(m, key) != default:
                raise ConfigError(
                    f"model.{key}: applies to model.mlp 'moe' only; leave it at its default with model.mlp {m.mlp!r}"
                )
    else:
        _validate_experts(m)
    if m.attn != "mla":
        for key, default in MLA_DEFAULTS.items():
            if getattr(m, key) != default:
                raise ConfigError(
                    f"model.{key}: applies to model.attn 'mla' only; leave it at its default with model.attn {m.attn!r}"
                )
    else:
        _validate_mla(m, p)
    if m.qk_norm_scope != "head" and (not m.qk_norm or m.attn != "mha"):
        raise ConfigError(
            f"model.qk_norm_scope: {m.qk_norm_scope!r} says how qk_norm normalizes; set model.qk_norm true (mha "
            "attention) or leave it 'head'"
        )
    sparse = m.mlp == "moe" or m.attn == "mla"
    what = "model.mlp 'moe'" if m.mlp == "moe" else "model.attn 'mla'"
    if sparse and m.quant != "none":
        raise ConfigError(f"model.quant: {m.quant!r} is not built for {what} yet; allowed: none")
    if sparse and getattr(par, "tp", 1) > 1:
        raise ConfigError(f"parallel.tp: tensor parallelism is not built for {what} yet; allowed: 1")


def _validate_experts(m) -> None:
    for key in ("moe_experts", "moe_top_k"):
        if getattr(m, key) is None:
            raise ConfigError(f"model.{key}: model.mlp 'moe' needs it (routed experts, and experts per token)")
    for key in ("moe_experts", "moe_top_k", "moe_hidden", "moe_groups", "moe_topk_groups", "moe_scale", "moe_every"):
        _positive(f"model.{key}", getattr(m, key))
    for key in ("moe_shared", "moe_first_dense"):
        _positive(f"model.{key}", getattr(m, key), allow_zero=True)
    if m.moe_top_k > m.moe_experts:
        raise ConfigError(
            f"model.moe_top_k: {m.moe_top_k} is larger than model.moe_experts ({m.moe_experts}); a token goes to at "
            "most every expert"
        )
    if m.moe_experts % m.moe_groups:
        raise ConfigError(f"model.moe_groups: must divide model.moe_experts ({m.moe_experts} % {m.moe_groups} != 0)")
    if m.moe_groups > 1:
        per_group = m.moe_experts // m.moe_groups
        if per_group < 2:
            raise ConfigError(
                f"model.moe_groups: {m.moe_groups} groups of {m.moe_experts} experts leave {per_group} a group; a "
                "group is scored by its two best experts (at least 2 a group)"
            )
        if m.moe_topk_groups > m.moe_groups:
            raise ConfigError(
                f"model.moe_topk_groups: {m.moe_topk_groups} is larger than model.moe_groups ({m.moe_groups})"
            )
        if m.moe_top_k > m.moe_topk_groups * per_group:
            raise ConfigError(
                f"model.moe_top_k: {m.moe_top_k} is more than the {m.moe_topk_groups * per_group} experts of the "
                f"model.moe_topk_groups ({m.moe_topk_groups}) groups a token keeps"
            )
    elif m.moe_topk_groups != 1:
        raise ConfigError("model.moe_topk_groups: applies with model.moe_groups > 1; leave it 1")
    listed = [x for x in m.moe_dense_layers.replace(" ", "").split(",") if x]
    for x in listed:
        if not x.isdigit() or int(x) >= m.n_layers:
            raise ConfigError(
                f"model.moe_dense_layers: {m.moe_dense_layers!r} must list layer indices 0..{m.n_layers - 1}, "
                "comma-separated (e.g. '0,5')"
            )


def _validate_mla(m, p) -> None:
    for key in ("mla_kv_rank", "mla_nope_dim", "mla_rope_dim", "mla_v_dim"):
        if getattr(m, key) is None:
            raise ConfigError(f"model.{key}: model.attn 'mla' needs it (the latent and per-head widths)")
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.mla_q_rank", m.mla_q_rank)
    for key in ("rope_mscale", "rope_mscale_all_dim"):
        _positive(f"model.{key}", getattr(m, key), allow_zero=True)
    if m.head_dim is not None:
        raise ConfigError("model.head_dim: model.attn 'mla' sets its head widths with mla_nope_dim, mla_rope_dim, "
                          "mla_v_dim; leave head_dim null")  # fmt: skip
    if m.n_kv_heads != m.n_heads:
        raise ConfigError(
            f"model.n_kv_heads: model.attn 'mla' gives every head its own keys and values (n_kv_heads = n_heads "
            f"= {m.n_heads}, got {m.n_kv_heads})"
        )
    if m.qk_norm:
        raise ConfigError("model.qk_norm: not built for model.attn 'mla' (its latent has its own norm); allowed: false")
    if p.kv != "cache":
        raise ConfigError(
            f"policy.kv: {p.kv!r} is not built for model.attn 'mla' (its cache already holds the small latent); "
            "allowed: cache"
        )
