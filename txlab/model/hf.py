"""Hugging Face checkpoints' weights in txlab's model: safetensors (sharded or not) mapped onto `GPT`.

The config side (`model.hf` filling the model section) is `txlab.config.hf`; this module maps tensors:

- GPT-2: Conv1D weights are stored (in, out) and transposed into nn.Linear's (out, in).
- Llama, Mistral, Qwen2, Qwen3: q, k and v projections are concatenated into one `qkv` (biases too),
  gate and up into one `fc`. Hugging Face rotates halves of each head (dimension i with i + D/2); txlab
  rotates adjacent pairs (2i with 2i + 1). So the rows of each q and k head (and Qwen3's q/k norm
  weights) are permuted into pair order on load: the same permutation of q and k leaves every dot
  product, hence every attention weight and logit, unchanged (tests/test_hf.py holds txlab to
  transformers' logits at fp32 tolerance).

A checkpoint whose tensors do not fit the config (a tensor missing, one left over, a wrong shape) is
refused naming the first offending tensor.
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


def _llama_names(m: ModelConfig) -> dict[str, tuple[str, ...]]:
    """txlab parameter -> the checkpoint tensors it is made of (Llama, Mistral, Qwen2, Qwen3)."""
    out = {"wte.weight": ("model.embed_tokens.weight",)}
    for i in range(m.n_layers):
        h, b = f"model.layers.{i}", f"blocks.{i}"
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


def _is_conv1d(name: str) -> bool:
    """GPT-2 stores its projection weights as Conv1D, (in, out): transposed from nn.Linear's."""
    return name.endswith(".weight") and any(k in name for k in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))


def _convert(name: str, parts: list[torch.Tensor], m: ModelConfig, family: str) -> torch.Tensor:
    """The checkpoint tensors of one txlab parameter, in txlab's layout."""
    if family == "gpt2":
        return parts[0].t() if _is_conv1d(name) else parts[0]
    D = m.attn_head_dim()
    if ".attn.qkv." in name:
        q, k, v = parts
        return torch.cat([_to_pairs(q, m.n_heads, D), _to_pairs(k, m.n_kv_heads, D), v])
    if name.endswith(("attn.q_norm.weight", "attn.k_norm.weight")):
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
    if len(shapes) > 1:
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return shapes[0]


def _match(model: GPT, spec: str) -> tuple[str, Path, dict[str, tuple[str, ...]]]:
    """Check that the checkpoint's tensors are exactly the model's, shapes included; return its family,
    directory and which checkpoint tensors make each parameter. ConfigError names the first misfit."""
    directory = checkpoint_dir(spec)
    if directory is None:
        raise ConfigError(f"model.hf: {spec}: model.init 'pretrained' needs a local checkpoint directory")
    family = read_hf_config(spec)["model_type"]
    shapes = _shapes(directory)
    names = _gpt2_names(model.cfg) if family == "gpt2" else _llama_names(model.cfg)
    mapping, used = {}, set()
    for name, param in model.named_parameters():  # each parameter once: a tied lm_head is wte
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


def check_pretrained(m: ModelConfig, seq_len: int) -> None:
    """Bad input before any work: the checkpoint's tensors must be the config's model (headers only)."""
    with torch.device("meta"):
        model = GPT(m, seq_len)
    _match(model, m.hf)


def load_pretrained(model: GPT, spec: str) -> None:
    """Copy the checkpoint `spec` (model.hf) into `model`, whose config must be the checkpoint's."""
    family, directory, mapping = _match(model, spec)
    tensors = read_safetensors(directory)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, theirs in mapping.items():
            params[name].copy_(_convert(name, [tensors[t] for t in theirs], model.cfg, family))


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
