"""Hugging Face checkpoints' weights in txlab's model: safetensors (sharded or not) mapped onto `GPT`.

The config side (`model.hf` filling the model section) is `txlab.config.hf`; this module maps tensors:

- GPT-2: Conv1D weights are stored (in, out) and transposed into nn.Linear's (out, in).
- Llama, Mistral, Qwen2, Qwen3: q, k and v projections are concatenated into one `qkv` (biases too),
  gate and up into one `fc`. Hugging Face rotates halves of each head (dimension i with i + D/2); txlab
  rotates adjacent pairs (2i with 2i + 1). So the rows of each q and k head (and Qwen3's q/k norm
  weights) are permuted into pair order on load: the same permutation of q and k leaves every dot
  product, hence every attention weight and logit, unchanged (tests/test_hf.py holds txlab to
  transformers' logits at fp32 tolerance).

- Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3: checkpoints hold each expert's gate, up and down projections
  apart (the hub's per-expert layout, which transformers 5's `save_pretrained` writes too); they are stacked
  into the MoE layer's (E, 2 * hidden, d_model) and (E, d_model, hidden) grouped weights, the router's
  weight and DeepSeek's correction bias (a buffer) copied. DeepSeek-V3's latent attention keeps its
  projections as they are; RoPE's part of q and of the latent's key is permuted into pair order only when
  the checkpoint rotates halves (`rope_interleave: false`). A DeepSeek-V3 checkpoint's multi-token
  prediction layers (`model.layers.N.*` past num_hidden_layers) are not part of the model and are skipped,
  as transformers skips them.

A checkpoint whose tensors do not fit the config (a tensor missing, one left over, a wrong shape, a layer
with another number of experts) is refused naming the first offending tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from txlab.config import ConfigError, ModelConfig, build_config
from txlab.config.hf import checkpoint_dir, read_hf_config
from txlab.model.gpt import GPT

# Tensors a checkpoint may carry that are not parameters (older GPT-2 exports' causal-mask buffers,
# rotary caches): skipped, not refused.
IGNORED_SUFFIXES = (".attn.masked_bias", "rotary_emb.inv_freq")


def _weight_files(directory: Path) -> list[Path]:
    """model.safetensors, or the shards its index names."""
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        files = [directory / "model.safetensors"]
    else:
        try:
            files = [directory / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise ConfigError(f"model.hf: {index}: not a safetensors index ({e.__class__.__name__}: {e})") from None
    for f in files:
        if not f.is_file():
            raise ConfigError(f"model.hf: {f}: weights file not found (model.init 'pretrained' reads safetensors)")
    return files


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (sharded or not)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in _weight_files(directory):
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - a corrupt file is bad input: one line naming it
            raise ConfigError(f"model.hf: {f}: not a readable safetensors file ({e.__class__.__name__})") from None
    return tensors


def _pair_order(head_dim: int) -> torch.Tensor:
    """Index that takes a head from half-rotation order (i, i + D/2) to pair order (2i, 2i + 1)."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=1).flatten()


def _to_pairs(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows (or entries, for a bias) of a q or k projection, head by head, into pair order."""
    shaped = t.reshape(n_heads, head_dim, *t.shape[1:])
    return shaped[:, _pair_order(head_dim)].reshape(t.shape)


def _gpt2_names(m: ModelConfig) -> dict[str, tuple[str, ...]]:
    """txlab parameter -> the checkpoint tensors it is made of (GPT-2)."""
    out = {"wte.weight": ("transformer.wte.weight",), "wpe.weight": ("transformer.wpe.weight",)}
    for i in range(m.n_layers):
        h, b = f"transformer.h.{i}", f"blocks.{i}"
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv", "attn.c_attn"),
                             ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):  # fmt: skip
            out[f"{b}.{ours}.weight"] = (f"{h}.{theirs}.weight",)
            out[f"{b}.{ours}.bias"] = (f"{h}.{theirs}.bias",)
    out["norm_f.weight"], out["norm_f.bias"] = ("transformer.ln_f.weight",), ("transformer.ln_f.bias",)
    out["lm_head.weight"] = ("lm_head.weight",)
    return out


def _llama_names(m: ModelConfig, family: str = "llama") -> dict[str, tuple[str, ...]]:
    """txlab parameter (or buffer) -> the checkpoint tensors it is made of (Llama, Mistral, Qwen2, Qwen3 and
    the MoE families)."""
    out = {"wte.weight": ("model.embed_tokens.weight",)}
    for i in range(m.n_layers):
        h, b = f"model.layers.{i}", f"blocks.{i}"
        out.update(_moe_names(m, family, h, b))
        if m.attn == "mla":
            out.update(_mla_names(h, b))
            continue
        out[f"{b}.norm1.weight"] = (f"{h}.input_layernorm.weight",)
        out[f"{b}.norm2.weight"] = (f"{h}.post_attention_layernorm.weight",)
        for kind in ("weight", "bias"):
            out[f"{b}.attn.qkv.{kind}"] = tuple(f"{h}.self_attn.{p}_proj.{kind}" for p in "qkv")
        out[f"{b}.attn.proj.weight"], out[f"{b}.attn.proj.bias"] = (
            (f"{h}.self_attn.o_proj.weight",),
            (f"{h}.self_attn.o_proj.bias",),
        )
        out[f"{b}.attn.q_norm.weight"], out[f"{b}.attn.k_norm.weight"] = (
            (f"{h}.self_attn.q_norm.weight",),
            (f"{h}.self_attn.k_norm.weight",),
        )
        for kind in ("weight", "bias"):
            out[f"{b}.mlp.fc.{kind}"] = (f"{h}.mlp.gate_proj.{kind}", f"{h}.mlp.up_proj.{kind}")
            out[f"{b}.mlp.proj.{kind}"] = (f"{h}.mlp.down_proj.{kind}",)
    out["norm_f.weight"], out["lm_head.weight"] = ("model.norm.weight",), ("lm_head.weight",)
    return out  # fmt: skip


def _moe_names(m: ModelConfig, family: str, h: str, b: str) -> dict[str, tuple[str, ...]]:
    """Layer h's router, routed experts (one tensor per expert and projection) and shared experts."""
    moe = f"{h}.block_sparse_moe" if family == "mixtral" else f"{h}.mlp"
    (gate, up), down = (("w1", "w3"), "w2") if family == "mixtral" else (("gate_proj", "up_proj"), "down_proj")
    experts = range(m.moe_experts or 0)
    shared = f"{h}.mlp.shared_experts"
    return {
        f"{b}.mlp.router.weight": (f"{moe}.gate.weight",),
        f"{b}.mlp.router.correction": (f"{moe}.gate.e_score_correction_bias",),
        f"{b}.mlp.experts.fc.weight": tuple(f"{moe}.experts.{e}.{p}.weight" for e in experts for p in (gate, up)),
        f"{b}.mlp.experts.proj.weight": tuple(f"{moe}.experts.{e}.{down}.weight" for e in experts),
        f"{b}.mlp.shared.fc.weight": (f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight"),
        f"{b}.mlp.shared.proj.weight": (f"{shared}.down_proj.weight",),
    }


def _mla_names(h: str, b: str) -> dict[str, tuple[str, ...]]:
    """Layer h's latent attention (DeepSeek-V3), projection for projection, and its norms."""
    a = f"{h}.self_attn"
    out = {
        f"{b}.norm1.weight": (f"{h}.input_layernorm.weight",),
        f"{b}.norm2.weight": (f"{h}.post_attention_layernorm.weight",),
        f"{b}.attn.q_norm.weight": (f"{a}.q_a_layernorm.weight",),
        f"{b}.attn.kv_norm.weight": (f"{a}.kv_a_layernorm.weight",),
    }
    for ours, theirs in (("q_down", "q_a_proj"), ("q_up", "q_b_proj"), ("q", "q_proj"),
                         ("kv_down", "kv_a_proj_with_mqa"), ("kv_up", "kv_b_proj"), ("proj", "o_proj")):  # fmt: skip
        for kind in ("weight", "bias"):
            out[f"{b}.attn.{ours}.{kind}"] = (f"{a}.{theirs}.{kind}",)
    for kind in ("weight", "bias"):  # dense first layers
        out[f"{b}.mlp.fc.{kind}"] = (f"{h}.mlp.gate_proj.{kind}", f"{h}.mlp.up_proj.{kind}")
        out[f"{b}.mlp.proj.{kind}"] = (f"{h}.mlp.down_proj.{kind}",)
    return out


def _rope_rows_to_pairs(t: torch.Tensor, n: int, width: int, start: int, rope: int) -> torch.Tensor:
    """Rows start:start + rope of each of the n blocks of `width` rows of t, from half-rotation order into
    pair order (the rest unchanged): the RoPE part of MLA's q heads, or of its latent's key."""
    shaped = t.reshape(n, width, *t.shape[1:]).clone()
    shaped[:, start : start + rope] = shaped[:, start : start + rope][:, _pair_order(rope)]
    return shaped.reshape(t.shape)


def _is_conv1d(name: str) -> bool:
    """GPT-2 stores its projection weights as Conv1D, (in, out): transposed from nn.Linear's."""
    return name.endswith(".weight") and any(k in name for k in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))


def _convert(
    name: str, parts: list[torch.Tensor], m: ModelConfig, family: str, rope_interleave: bool = True
) -> torch.Tensor:
    """The checkpoint tensors of one txlab parameter, in txlab's layout. `rope_interleave`: an MLA checkpoint
    rotates adjacent pairs (DeepSeek-V3's default, txlab's order), else halves."""
    if family == "gpt2":
        return parts[0].t() if _is_conv1d(name) else parts[0]
    if name.endswith("mlp.experts.fc.weight"):  # (gate_e, up_e) per expert -> (E, 2 * hidden, d_model)
        return torch.stack([torch.cat(parts[i : i + 2]) for i in range(0, len(parts), 2)])
    if name.endswith("mlp.experts.proj.weight"):  # down_e per expert -> (E, d_model, hidden)
        return torch.stack(parts)
    if m.attn == "mla":
        if not rope_interleave and name.endswith(("attn.q_up.weight", "attn.q.weight")):
            return _rope_rows_to_pairs(parts[0], m.n_heads, m.attn_head_dim(), m.mla_nope_dim, m.mla_rope_dim)
        if not rope_interleave and name.endswith(("attn.kv_down.weight", "attn.kv_down.bias")):
            return _rope_rows_to_pairs(parts[0], 1, m.mla_kv_rank + m.mla_rope_dim, m.mla_kv_rank, m.mla_rope_dim)
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    D = m.attn_head_dim()
    if ".attn.qkv." in name:
        q, k, v = parts
        return torch.cat([_to_pairs(q, m.n_heads, D), _to_pairs(k, m.n_kv_heads, D), v])
    if name.endswith(("attn.q_norm.weight", "attn.k_norm.weight")):
        if m.qk_norm_scope == "projection":  # OLMoE: one weight per projection row, permuted head by head
            return _to_pairs(parts[0], m.n_heads if ".q_norm." in name else m.n_kv_heads, D)
        return parts[0][_pair_order(D)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a checkpoint, read from the safetensors headers (no data)."""
    from safetensors import safe_open

    out = {}
    for f in _weight_files(directory):
        try:
            with safe_open(str(f), framework="pt") as st:
                out.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
        except Exception as e:  # noqa: BLE001 - a corrupt file is bad input: one line naming it
            raise ConfigError(f"model.hf: {f}: not a readable safetensors file ({e.__class__.__name__})") from None
    return {k: v for k, v in out.items() if not k.endswith(IGNORED_SUFFIXES)}


def _converted_shape(name: str, shapes: list[tuple[int, ...]], family: str) -> tuple[int, ...]:
    """The shape `_convert` gives the tensors of one parameter (without reading them)."""
    if family == "gpt2" and _is_conv1d(name):
        return shapes[0][::-1]  # Conv1D (in, out)
    if name.endswith("mlp.experts.fc.weight"):
        return (len(shapes) // 2, shapes[0][0] + shapes[1][0], *shapes[0][1:])
    if name.endswith("mlp.experts.proj.weight"):
        return (len(shapes), *shapes[0])
    if len(shapes) > 1:
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return shapes[0]


def _match(model: GPT, spec: str) -> tuple[str, Path, dict[str, tuple[str, ...]]]:
    """Check that the checkpoint's tensors are exactly the model's, shapes included; return its family,
    directory and which checkpoint tensors make each parameter. ConfigError names the first misfit."""
    directory = checkpoint_dir(spec)
    if directory is None:
        raise ConfigError(f"model.hf: {spec}: model.init 'pretrained' needs a local checkpoint directory")
    hf = read_hf_config(spec)
    family = hf["model_type"]
    if hf.get("quantization_config"):
        method = (
            hf["quantization_config"].get("quant_method", "?") if isinstance(hf["quantization_config"], dict) else "?"
        )
        raise ConfigError(
            f"model.hf: {spec}: a quantized checkpoint ({method}) is not read; model.init 'pretrained' takes "
            "full-precision weights (bf16 or fp32), model.init 'random' its shape"
        )
    shapes = _shapes(directory)
    if family == "deepseek_v3":  # multi-token prediction layers: not part of the model (transformers skips them)
        shapes = {k: v for k, v in shapes.items() if _layer_of(k) is None or _layer_of(k) < model.cfg.n_layers}
    _check_experts(model.cfg, spec, shapes)
    names = _gpt2_names(model.cfg) if family == "gpt2" else _llama_names(model.cfg, family)
    mapping, used = {}, set()
    for name, param in _tensors_to_load(model):  # each parameter once: a tied lm_head is wte
        theirs = names.get(name)
        if theirs is None:
            raise ConfigError(f"model.hf: {spec}: txlab parameter {name!r} has no counterpart in a {family} checkpoint")
        missing = [t for t in theirs if t not in shapes]
        if missing:
            raise ConfigError(f"model.hf: {spec}: tensor {missing[0]!r} is missing from the checkpoint")
        if _converted_shape(name, [shapes[t] for t in theirs], family) != tuple(param.shape):
            raise ConfigError(
                f"model.hf: {spec}: tensor {theirs[0]!r} has shape {shapes[theirs[0]]}, "
                f"which does not fit the config ({name} is {tuple(param.shape)})"
            )
        mapping[name] = theirs
        used.update(theirs)
    if model.cfg.tie_weights:
        used.add(names["lm_head.weight"][0])  # a tied checkpoint may store the shared matrix twice
    extra = sorted(set(shapes) - used)
    if extra:
        raise ConfigError(f"model.hf: {spec}: tensor {extra[0]!r} is in the checkpoint but not in the config's model")
    return family, directory, mapping


def _layer_of(tensor: str) -> int | None:
    parts = tensor.split(".")
    if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return None


def _check_experts(m: ModelConfig, spec: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """Each MoE layer of the checkpoint holds the config's number of experts (one line naming the layer)."""
    held: dict[int, set[int]] = {}
    for k in shapes:
        parts = k.split(".")
        if "experts" in parts and _layer_of(k) is not None:
            i = parts.index("experts")
            if i + 1 < len(parts) and parts[i + 1].isdigit():
                held.setdefault(_layer_of(k), set()).add(int(parts[i + 1]))
    for layer in range(m.n_layers):
        want = m.moe_experts if m.moe_layer(layer) else 0
        have = len(held.get(layer, ()))
        if have != want:
            config = f"the config gives it {want}" + (" (a dense MLP)" if not want else " (model.moe_experts)")
            raise ConfigError(
                f"model.hf: {spec}: layer {layer} of the checkpoint holds {have} experts, but {config}; "
                "the checkpoint's expert weights do not match its config"
            )


def _tensors_to_load(model: GPT) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters, and the buffers a checkpoint holds (DeepSeek-V3's routing correction bias)."""
    buffers = [(n, b) for n, b in model.named_buffers() if n.endswith("router.correction")]
    return [*model.named_parameters(), *buffers]


def check_pretrained(m: ModelConfig, seq_len: int) -> None:
    """Bad input before any work: the checkpoint's tensors must be the config's model (headers only)."""
    with torch.device("meta"):
        model = GPT(m, seq_len)
    _match(model, m.hf)


def load_pretrained(model: GPT, spec: str) -> None:
    """Copy the checkpoint `spec` (model.hf) into `model`, whose config must be the checkpoint's."""
    family, directory, mapping = _match(model, spec)
    tensors = read_safetensors(directory)
    params = dict(_tensors_to_load(model))
    interleave = bool(read_hf_config(spec).get("rope_interleave", True))
    with torch.no_grad():
        for name, theirs in mapping.items():
            params[name].copy_(_convert(name, [tensors[t] for t in theirs], model.cfg, family, interleave))


def init_model(m: ModelConfig, seq_len: int) -> GPT:
    """The model of a config: GPT-2's random init (seed it first), or with `model.init: pretrained` the
    weights of `model.hf`. Under fake tensors (the estimator) the weights are not read: memory does not
    depend on their values."""
    from torch._subclasses.fake_tensor import is_fake

    model = GPT(m, seq_len)
    if m.init == "pretrained" and not is_fake(model.wte.weight):
        load_pretrained(model, m.hf)
    return model


def from_pretrained(path_or_id: str, seq_len: int | None = None, **model_keys) -> GPT:
    """The txlab model of a Hugging Face checkpoint, with its weights, in eval mode; `model.logits(idx)`
    gives (B, T, vocab) logits. `seq_len`: positions it holds (GPT-2: default its position table; RoPE
    models: the rotary tables, default 4096). Extra `model.*` keys override the checkpoint's config
    (the weights must still fit)."""
    model_raw = {"hf": path_or_id, "init": "pretrained", **model_keys}
    if seq_len is None:
        m = build_config({"model": model_raw, "workload": {"seq_len": 1}}).model
        seq_len = m.n_positions or 4096
    cfg = build_config({"model": model_raw, "workload": {"seq_len": seq_len}})
    return init_model(cfg.model, seq_len).eval()
