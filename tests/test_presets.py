"""`model.size` presets: the 0.1 sizes unchanged, and the real architectures (Llama 3.1/3.2, Mistral 7B
v0.3, Qwen2.5, Qwen3) built from their published config.json with the parameter counts published for them."""

from __future__ import annotations

import json

import pytest
import torch

from txlab.config import build_config, load_config
from txlab.config.hf import model_keys
from txlab.config.presets import MODEL_SIZES, PUBLISHED_CONFIGS
from txlab.model.gpt import GPT

# The 0.1 presets, as txlab 0.1 shipped them (their trial keys are pinned in tests/test_identity.py).
SIZES_V0_1 = {
    "debug": dict(n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, vocab_size=256),
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, vocab_size=50257),
    "gpt2-medium": dict(n_layers=24, d_model=1024, n_heads=16, n_kv_heads=16, vocab_size=50257),
    "gpt2-large": dict(n_layers=36, d_model=1280, n_heads=20, n_kv_heads=20, vocab_size=50257),
    "gpt2-xl": dict(n_layers=48, d_model=1600, n_heads=25, n_kv_heads=25, vocab_size=50257),
}

# Published total parameter counts, 3 significant digits, in billions: the figure on each model's Hugging Face
# page (from its safetensors headers). Where a model card prints a truncated figure it is noted.
PUBLISHED_B = {
    "llama-3.2-1b": 1.24,  # Meta's model card lists "1.23B": 1,235,814,400 truncated
    "llama-3.1-8b": 8.03,
    "llama-3.1-70b": 70.6,
    "mistral-7b": 7.25,
    "qwen2.5-7b": 7.62,  # Qwen's model card: "7.61B", non-embedding "6.53B" (7,615,616,512 truncated)
    "qwen3-8b": 8.19,  # Qwen's model card: "8.2B", non-embedding "6.95B"
}

# Non-embedding counts the Qwen model cards publish (total less the input embedding and the output head).
PUBLISHED_NON_EMBEDDING_B = {"qwen2.5-7b": 6.53, "qwen3-8b": 6.95}


def hand_count(hf: dict) -> int:
    """Parameters of a Llama-style decoder from its config.json, counted by hand (no txlab code):
    per layer q (d x H hd), k and v (d x KV hd each), o (H hd x d), three SwiGLU matrices (d x ff), two RMSNorm
    vectors (d); q/k/v biases for Qwen2; q_norm and k_norm (hd each) for Qwen3; then the embedding (V x d),
    the final norm (d) and an output head (V x d) unless tied."""
    d, L, V, ff = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"], hf["intermediate_size"]
    H, KV = hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = hf.get("head_dim") or d // H
    attn = d * H * hd + 2 * d * KV * hd + H * hd * d
    if hf["model_type"] == "qwen2":
        attn += H * hd + 2 * KV * hd
    if hf["model_type"] == "qwen3":
        attn += 2 * hd
    layer = attn + 3 * d * ff + 2 * d
    embed = V * d * (1 if hf["tie_word_embeddings"] else 2)
    return L * layer + d + embed


# The same counts written out, so a change to a shape shows as a changed number:
# llama-3.2-1b: 16 x (10,485,760 attn + 50,331,648 mlp + 4,096) + 2,048 + 262,668,288 (tied)
# llama-3.1-8b: 32 x (41,943,040 + 176,160,768 + 8,192) + 4,096 + 2 x 525,336,576
# llama-3.1-70b: 80 x (150,994,944 + 704,643,072 + 16,384) + 8,192 + 2 x 1,050,673,152
# mistral-7b: 32 x (41,943,040 + 176,160,768 + 8,192) + 4,096 + 2 x 134,217,728
# qwen2.5-7b: 28 x (29,364,736 incl. 4,608 q/k/v biases + 203,685,888 + 7,168) + 3,584 + 2 x 544,997,376
# qwen3-8b: 36 x (41,943,296 incl. 256 q/k norms + 150,994,944 + 8,192) + 4,096 + 2 x 622,329,856
EXACT = {
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "mistral-7b": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
}

REAL = list(PUBLISHED_CONFIGS)


def meta_model(name: str) -> GPT:
    cfg = load_config(None, [f"model.size={name}"])
    with torch.device("meta"):
        return GPT(cfg.model, 8)


def test_the_real_presets_are_the_listed_models():
    assert set(REAL) == set(PUBLISHED_B) == set(EXACT)
    assert set(MODEL_SIZES) == set(SIZES_V0_1) | set(REAL)


def test_the_0_1_presets_are_unchanged():
    for name, keys in SIZES_V0_1.items():
        assert MODEL_SIZES[name] == keys, name


@pytest.mark.parametrize("name", REAL)
def test_a_real_preset_is_model_keys_of_its_published_config(name):
    assert MODEL_SIZES[name] == model_keys(PUBLISHED_CONFIGS[name])


@pytest.mark.parametrize("name", REAL)
def test_parameter_count_matches_the_published_figure(name):
    n = meta_model(name).num_params()
    assert n == hand_count(PUBLISHED_CONFIGS[name]) == EXACT[name]
    assert float(f"{n / 1e9:.3g}") == PUBLISHED_B[name], f"{name}: {n:,} parameters"
    if name in PUBLISHED_NON_EMBEDDING_B:
        hf = PUBLISHED_CONFIGS[name]
        embed = hf["vocab_size"] * hf["hidden_size"] * (1 if hf["tie_word_embeddings"] else 2)
        assert float(f"{(n - embed) / 1e9:.3g}") == PUBLISHED_NON_EMBEDDING_B[name]


@pytest.mark.parametrize("name", REAL)
def test_a_real_preset_builds_a_valid_config(name):
    cfg = build_config({"model": {"size": name}, "workload": {"seq_len": 8192, "dtype": "bf16"}})
    m, hf = cfg.model, PUBLISHED_CONFIGS[name]
    assert (m.size, m.norm, m.pos, m.mlp) == (name, "rmsnorm", "rope", "swiglu")
    assert m.attn_head_dim() == (hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    assert (m.n_heads, m.n_kv_heads) == (hf["num_attention_heads"], hf["num_key_value_heads"])
    assert m.mlp_width() == hf["intermediate_size"] and not m.mlp_bias and not m.attn_out_bias
    assert m.tie_weights == (name == "llama-3.2-1b")
    assert m.attn_bias == (name == "qwen2.5-7b") and m.qk_norm == (name == "qwen3-8b")
    if name.startswith("llama"):
        factor = 32.0 if name == "llama-3.2-1b" else 8.0
        assert (m.rope_scaling, m.rope_factor, m.rope_low_freq_factor, m.rope_high_freq_factor) == (
            "llama3",
            factor,
            1.0,
            4.0,
        )
        assert (m.rope_original_len, m.rope_theta) == (8192, 500000.0)
    else:
        assert (m.rope_scaling, m.rope_theta) == ("none", 1e6)
    assert len(cfg.trial_key) == 16


@pytest.mark.parametrize("name", REAL)
def test_model_hf_on_the_published_config_gives_the_preset(name, tmp_path):
    """`model.hf: DIR` (a config.json as published) and `model.size: NAME` resolve to the same model."""
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIGS[name]))
    via_hf = build_config({"model": {"hf": str(tmp_path)}}).flat()
    via_size = build_config({"model": {"size": name}}).flat()
    differ = {k for k in via_hf if via_hf[k] != via_size[k]}
    assert differ == {"model.hf", "model.size"}


def test_the_real_models_frontier_spec_estimates_every_real_preset():
    """sweeps/frontier_real_models.yaml: estimates only, every real preset, 80 and 141 GiB (70B at 80 only:
    its state alone is over 1 TiB), bf16 on CUDA, Llama 3.2 1B up to its 128k context."""
    from txlab.sweeps.spec import expand, load_spec

    spec = load_spec("sweeps/frontier_real_models.yaml")
    assert spec.mode == "estimate" and spec.gpu == 0
    trials = [t.config for t in expand(spec).trials]
    assert len(trials) == 192 and {c.model.size for c in trials} == set(REAL)
    assert {(c.measure.device, c.workload.dtype, c.workload.kind) for c in trials} == {("cuda", "bf16", "train")}
    assert {c.measure.budget_gib for c in trials if c.model.size == "llama-3.1-70b"} == {80}
    assert {c.measure.budget_gib for c in trials} == {80, 141}
    assert max(c.workload.seq_len for c in trials if c.model.size == "llama-3.2-1b") == 131072
