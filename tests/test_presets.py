"""`model.size` presets: the 0.1 sizes unchanged, and the real architectures (Llama 3.1/3.2, Mistral 7B
v0.3, Qwen2.5, Qwen3) built from their published config.json with the parameter counts published for them."""

from __future__ import annotations

import json

import pytest
import torch

from txlab.config import build_config, load_config
from txlab.config.hf import model_keys
from txlab.config.presets import MODEL_SIZES, PUBLISHED_CONFIGS, PUBLISHED_MOE_CONFIGS
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
    assert set(MODEL_SIZES) == set(SIZES_V0_1) | set(REAL) | set(PUBLISHED_MOE_CONFIGS)


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


# --- mixture-of-experts presets (issue 25) ----------------------------------------------------------------------

MOE = list(PUBLISHED_MOE_CONFIGS)
# Published figures, billions: total and activated per token. Mixtral 8x7B: Mistral's announcement (46.7B total,
# 12.9B per token); Qwen3-30B-A3B: Qwen's model card (30.5B total, 3.3B activated, 29.9B non-embedding);
# OLMoE-1B-7B: the OLMoE paper (6.9B total, 1.3B active); DeepSeek-V3: its technical report (671B total, 37B
# activated; the Hugging Face repository's 685B adds the 14B multi-token prediction module, which is not part
# of the model).
PUBLISHED_MOE_B = {
    "mixtral-8x7b": (46.7, 12.9),
    "qwen3-30b-a3b": (30.5, 3.3),
    "olmoe-1b-7b": (6.9, 1.3),
    "deepseek-v3": (671.0, 37.0),
}
# txlab's counts: equal to hand_count_moe below (total, active).
EXACT_MOE = {
    "mixtral-8x7b": (46_702_792_704, 12_879_925_248),
    "qwen3-30b-a3b": (30_532_122_624, 3_353_032_704),
    "olmoe-1b-7b": (6_919_161_856, 1_282_017_280),
    "deepseek-v3": (671_026_404_352, 37_552_282_624),
}


def hand_count_moe(hf: dict) -> tuple[int, int]:
    """(total, per-token) parameters of a mixture-of-experts config.json, by hand (no txlab code): attention per
    layer (q, k, v, o, and Qwen3's per-head or OLMoE's whole-projection q/k norms; DeepSeek's latent attention:
    q down (d x q_rank), its norm, q up (q_rank x H (nope + rope)), kv down (d x (kv_rank + rope)), its norm, kv up
    (kv_rank x H (nope + v)), o (H v x d)); a sparse layer's router (E x d), E SwiGLU experts (3 d ff_moe each) and
    shared experts; a dense layer's SwiGLU (3 d ff); two norms a layer, the final norm, embedding and head. A token
    uses all but E - k routed experts of each sparse layer."""
    t = hf["model_type"]
    d, L, V, H = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"], hf["num_attention_heads"]
    if t == "deepseek_v3":
        qr, kr, nope, rope, v = (hf[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                                "v_head_dim"))  # fmt: skip
        attn = d * qr + qr + qr * H * (nope + rope) + d * (kr + rope) + kr + kr * H * (nope + v) + H * v * d
    else:
        KV = hf["num_key_value_heads"]
        hd = hf.get("head_dim") or d // H
        attn = 2 * d * H * hd + 2 * d * KV * hd
        attn += {"qwen3_moe": 2 * hd, "olmoe": H * hd + KV * hd}.get(t, 0)
    E = hf.get("num_local_experts") or hf.get("num_experts") or hf["n_routed_experts"]
    k = hf["num_experts_per_tok"]
    ff_moe = hf.get("moe_intermediate_size") or hf["intermediate_size"]
    expert = 3 * d * ff_moe
    sparse_layer = E * d + E * expert + hf.get("n_shared_experts", 0) * expert
    dense_layer = 3 * d * hf["intermediate_size"]
    n_dense = hf.get("first_k_dense_replace", 0)
    total = L * (attn + 2 * d) + n_dense * dense_layer + (L - n_dense) * sparse_layer + d + 2 * V * d
    return total, total - (L - n_dense) * (E - k) * expert


@pytest.mark.parametrize("name", MOE)
def test_a_moe_preset_is_model_keys_of_its_published_config(name, tmp_path):
    assert MODEL_SIZES[name] == model_keys(PUBLISHED_MOE_CONFIGS[name])
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_MOE_CONFIGS[name]))
    via_hf = build_config({"model": {"hf": str(tmp_path)}}).flat()
    via_size = build_config({"model": {"size": name}}).flat()
    assert {k for k in via_hf if via_hf[k] != via_size[k]} == {"model.hf", "model.size"}


@pytest.mark.parametrize("name", MOE)
def test_moe_parameter_counts_match_the_published_totals_and_active_figures(name):
    """Totals, rounded to the published figure's last digit, equal it (46.7, 30.5, 6.9, 671). Active (per-token) figures are published with
    two significant digits, rounded (Mistral's 12.9) or truncated (Qwen's 3.3 for 3.35, DeepSeek's 37 for 37.6,
    as Qwen's dense cards truncate): one unit of that digit is 3% of 3.3B, so they are held to 2%. txlab counts
    both embedding matrices as active (a token reads its row and the whole output head): DeepSeek-V3's 37.6B
    less the 0.93B input embedding is 36.6B, which rounds to 37 too."""
    model = meta_model(name)
    n, active = model.num_params(), model.num_active_params()
    assert (n, active) == hand_count_moe(PUBLISHED_MOE_CONFIGS[name]) == EXACT_MOE[name]
    total_b, active_b = PUBLISHED_MOE_B[name]
    assert round(n / 1e9, 1 if total_b < 100 else 0) == total_b, f"{name}: {n:,} parameters"
    assert abs(active / 1e9 / active_b - 1) <= 0.02, f"{name}: {active:,} active"


def test_the_qwen3_moe_card_s_non_embedding_figure():
    hf = PUBLISHED_MOE_CONFIGS["qwen3-30b-a3b"]
    n = meta_model("qwen3-30b-a3b").num_params()
    assert round((n - 2 * hf["vocab_size"] * hf["hidden_size"]) / 1e9, 1) == 29.9


@pytest.mark.parametrize("name", MOE)
def test_a_moe_preset_builds_a_valid_config(name):
    cfg = build_config({"model": {"size": name}, "workload": {"seq_len": 4096, "dtype": "bf16"}})
    m, hf = cfg.model, PUBLISHED_MOE_CONFIGS[name]
    assert (m.mlp, m.moe_top_k, m.norm, m.pos) == ("moe", hf["num_experts_per_tok"], "rmsnorm", "rope")
    sparse = sum(m.moe_layer(i) for i in range(m.n_layers))
    assert sparse == m.n_layers - hf.get("first_k_dense_replace", 0)
    if name == "deepseek-v3":
        assert (m.attn, m.moe_router, m.moe_groups, m.moe_topk_groups, m.moe_scale) == ("mla", "sigmoid", 8, 4, 2.5)
        assert (m.rope_scaling, m.rope_factor, m.rope_original_len, m.rope_mscale_all_dim) == ("yarn", 40.0, 4096, 1.0)
    assert len(cfg.trial_key) == 16
