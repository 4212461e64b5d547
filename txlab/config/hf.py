"""`model.hf`: the model section filled from a Hugging Face checkpoint's `config.json`.

A local directory (holding config.json), a config.json file, or a hub id (read through
`transformers.AutoConfig`, so only where the machine is online). The families txlab builds faithfully
(tests/test_hf.py holds each to transformers' logits): GPT-2, Llama (1, 2, 3 and Llama 3.1's RoPE
scaling), Mistral, Qwen2, Qwen3. The values are the checkpoint's, as a preset is a size's: explicit
model keys still win. Dropout is left at txlab's default (0): trials measure, they do not regularise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from txlab.config.errors import ConfigError

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


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
    elif kind != "default":
        raise ConfigError(f"model.hf: RoPE scaling {kind!r} is not supported; supported: default, llama3")
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
        return dict(
            n_layers=int(hf["num_hidden_layers"]), d_model=int(hf["hidden_size"]), n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads), vocab_size=int(hf["vocab_size"]),
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads), mlp_hidden=int(hf["intermediate_size"]),
            norm="rmsnorm", pos="rope", mlp="swiglu", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            attn_bias=bias, attn_out_bias=bool(hf.get("attention_bias", False)) and family != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=family == "qwen3",
            tie_weights=bool(hf.get("tie_word_embeddings", False)), **_rope(hf),
        )  # fmt: skip
    except KeyError as e:
        raise ConfigError(f"{where}: config.json lacks {e.args[0]!r}, which a {family} config has") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: config.json has a value of the wrong type ({e})") from None
