"""`model.hf`: the model section filled from a Hugging Face checkpoint's `config.json`.

A local directory (holding config.json), a config.json file, or a hub id (read through
`transformers.AutoConfig`, so only where the machine is online). The families txlab builds faithfully
(tests/test_hf.py holds each to transformers' logits): GPT-2, Llama (1, 2, 3 and Llama 3.1's RoPE
scaling), Mistral, Qwen2, Qwen3, and the mixture-of-experts families (tests/test_moe.py) Mixtral, Qwen3-MoE,
OLMoE and DeepSeek-V3 (latent attention). The values are the checkpoint's, as a preset is a size's: explicit
model keys still win. Dropout is left at txlab's default (0): trials measure, they do not regularise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from txlab.config.errors import ConfigError

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "olmoe", "deepseek_v3")


def checkpoint_dir(spec: str) -> Path | None:
    """The local directory of a checkpoint given as a directory or its config.json; None for a hub id."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    if p.name == "config.json" and p.is_file():
        return p.parent
    return None


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".json") or spec.count("/") != 1


def read_hf_config(spec: str) -> dict[str, Any]:
    """The checkpoint's config.json as a dict; ConfigError naming `model.hf` and the path otherwise."""
    local = checkpoint_dir(spec)
    if local is None:
        if _looks_local(spec) or Path(spec).exists():
            raise ConfigError(f"model.hf: {spec}: no such checkpoint directory or config.json")
        return _hub_config(spec)
    path = local / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.hf: {local}: no config.json in the directory")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.hf: {path}: not a JSON config ({e.__class__.__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model.hf: {path}: config.json must hold a JSON object")
    return data


def _hub_config(repo_id: str) -> dict[str, Any]:
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(repo_id).to_dict()
    except Exception as e:  # noqa: BLE001 - offline, unknown id, gated: one line naming the id
        first = str(e).splitlines()[0][:300] if str(e) else e.__class__.__name__
        raise ConfigError(
            f"model.hf: {repo_id!r} is not a local checkpoint and the hub could not be read ({first}); "
            "pass a local directory holding config.json"
        ) from None


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE base and scaling, from transformers 5's `rope_parameters` or the older top-level keys."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or params
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "llama3":
        out.update(
            rope_scaling="llama3",
            rope_factor=float(scaling["factor"]),
            rope_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_original_len=int(scaling["original_max_position_embeddings"]),
        )
    elif kind == "yarn":
        if scaling.get("attention_factor") is not None or scaling.get("truncate", True) is False:
            raise ConfigError("model.hf: YaRN with attention_factor or truncate false is not supported")
        orig = int(scaling["original_max_position_embeddings"])
        factor = scaling.get("factor") or hf["max_position_embeddings"] / orig
        out.update(
            rope_scaling="yarn", rope_factor=float(factor), rope_original_len=orig,
            rope_beta_fast=float(scaling.get("beta_fast") or 32), rope_beta_slow=float(scaling.get("beta_slow") or 1),
            rope_mscale=float(scaling.get("mscale") or 0.0), rope_mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0),
        )  # fmt: skip
    elif kind != "default":
        raise ConfigError(f"model.hf: RoPE scaling {kind!r} is not supported; supported: default, llama3, yarn")
    return out


def model_keys(hf: dict[str, Any], where: str = "model.hf") -> dict[str, Any]:
    """txlab model keys for a Hugging Face config dict (the families in FAMILIES)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ConfigError(f"{where}: model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    try:
        if family == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ConfigError(f"{where}: GPT-2 activation {act!r} is not supported; supported: gelu_new")
            d = int(hf["n_embd"])
            return dict(
                n_layers=int(hf["n_layer"]), d_model=d, n_heads=int(hf["n_head"]), n_kv_heads=int(hf["n_head"]),
                vocab_size=int(hf["vocab_size"]), n_positions=int(hf["n_positions"]), norm="layernorm",
                pos="learned", mlp="gelu", mlp_hidden=int(hf.get("n_inner") or 4 * d),
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), tie_weights=bool(hf.get("tie_word_embeddings", True)),
            )  # fmt: skip
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: activation {hf['hidden_act']!r} is not supported; supported: silu")
        window = hf.get("sliding_window")
        if window is not None and hf.get("use_sliding_window", True):
            raise ConfigError(
                f"{where}: sliding-window attention (window {window}) is not supported; txlab computes full "
                "causal attention (a checkpoint without a window, e.g. Mistral v0.3, is)"
            )
        heads = int(hf["num_attention_heads"])
        bias = bool(hf.get("attention_bias", family == "qwen2"))  # Qwen2's q/k/v always have biases
        keys = dict(
            n_layers=int(hf["num_hidden_layers"]), d_model=int(hf["hidden_size"]), n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads), vocab_size=int(hf["vocab_size"]),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads), mlp_hidden=int(hf["intermediate_size"]),
            norm="rmsnorm", pos="rope", mlp="swiglu", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            attn_bias=bias, attn_out_bias=bool(hf.get("attention_bias", False)) and family != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=family == "qwen3",
            tie_weights=bool(hf.get("tie_word_embeddings", False)), **_rope(hf),
        )  # fmt: skip
        keys.update(_moe_keys(hf, family, where))
        return keys
    except KeyError as e:
        raise ConfigError(f"{where}: config.json lacks {e.args[0]!r}, which a {family} config has") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: config.json has a value of the wrong type ({e})") from None


def _experts(hf: dict[str, Any], *names: str) -> int:
    """The routed experts' count, under whichever name this family's config.json writes it."""
    for name in names:
        if hf.get(name) is not None:
            return int(hf[name])
    raise KeyError(names[0])


def _moe_keys(hf: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    """The mixture-of-experts (and latent-attention) keys of the MoE families, as transformers 5 builds them."""
    match family:
        case "mixtral":  # softmax over the experts, top-k renormalised; every layer sparse
            if float(hf.get("router_jitter_noise") or 0.0):
                raise ConfigError(
                    f"{where}: router_jitter_noise {hf['router_jitter_noise']} is not supported; supported: 0"
                )
            return dict(mlp="moe", moe_experts=_experts(hf, "num_local_experts"), moe_top_k=int(hf["num_experts_per_tok"]),
                        moe_hidden=int(hf["intermediate_size"]), moe_renorm=True)  # fmt: skip
        case "qwen3_moe":  # layer i sparse unless listed in mlp_only_layers or (i + 1) % decoder_sparse_step
            experts = _experts(hf, "num_experts", "num_local_experts")
            if experts == 0:
                return dict(qk_norm=True)
            dense = [int(i) for i in hf.get("mlp_only_layers") or []]
            return dict(mlp="moe", moe_experts=experts, moe_top_k=int(hf["num_experts_per_tok"]),
                        moe_hidden=int(hf["moe_intermediate_size"]), moe_renorm=bool(hf.get("norm_topk_prob", False)),
                        moe_every=int(hf.get("decoder_sparse_step", 1)), moe_dense_layers=",".join(map(str, dense)),
                        qk_norm=True)  # fmt: skip
        case "olmoe":  # q and k RMSNorm over their whole projections
            if hf.get("clip_qkv") is not None:
                raise ConfigError(f"{where}: clip_qkv {hf['clip_qkv']} is not supported; supported: null")
            return dict(mlp="moe", moe_experts=_experts(hf, "num_experts", "num_local_experts"),
                        moe_top_k=int(hf["num_experts_per_tok"]), moe_hidden=int(hf["intermediate_size"]),
                        moe_renorm=bool(hf.get("norm_topk_prob", False)), qk_norm=True, qk_norm_scope="projection")  # fmt: skip
        case "deepseek_v3":  # MLA; sigmoid router with correction bias, expert groups; shared experts; dense first
            if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
                raise ConfigError(f"{where}: DeepSeek routing {hf.get('scoring_func')!r}/{hf.get('topk_method')!r} "
                                  "is not supported; supported: sigmoid/noaux_tc (DeepSeek-V3)")  # fmt: skip
            heads = int(hf["num_attention_heads"])
            q_rank = hf.get("q_lora_rank")
            groups = int(hf.get("n_group") or 1)
            return dict(
                attn="mla", head_dim=None, n_kv_heads=heads, mla_q_rank=None if q_rank is None else int(q_rank),
                mla_kv_rank=int(hf["kv_lora_rank"]), mla_nope_dim=int(hf["qk_nope_head_dim"]),
                mla_rope_dim=int(hf["qk_rope_head_dim"]), mla_v_dim=int(hf["v_head_dim"]),
                mlp="moe", moe_experts=_experts(hf, "n_routed_experts", "num_local_experts"),
                moe_top_k=int(hf["num_experts_per_tok"]), moe_hidden=int(hf["moe_intermediate_size"]),
                moe_shared=int(hf.get("n_shared_experts") or 0), moe_router="sigmoid",
                moe_renorm=bool(hf.get("norm_topk_prob", True)), moe_groups=groups,
                moe_topk_groups=int(hf.get("topk_group") or 1) if groups > 1 else 1,
                moe_scale=float(hf.get("routed_scaling_factor", 1.0)),
                moe_first_dense=int(hf.get("first_k_dense_replace") or 0),
            )  # fmt: skip
        case _:
            return {}
