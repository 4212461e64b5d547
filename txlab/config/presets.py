"""Named presets: model sizes (`model.size`) and memory policies (`policy.name`), each a partial config
that explicit keys override.
"""

from __future__ import annotations

from typing import Any

from txlab.config.hf import model_keys

# --- real architectures: shapes from the models' published config.json (no weights) ---------------------
# Each dict holds the fields of the Hugging Face repository's config.json that decide the model (copied as
# published; the rest, e.g. token ids and torch_dtype, left out). MODEL_SIZES maps them with
# txlab.config.hf.model_keys, the one mapping `model.hf` uses too, so `model.size: llama-3.1-8b` and
# `model.hf: <that checkpoint>` resolve to the same model keys. Parameter counts (tests/test_presets.py)
# are computed from these shapes and match the published figures.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.2-1B config.json: GQA 32/8 heads of 64, tied embeddings, llama3 RoPE factor 32.
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "hidden_act": "silu", "rms_norm_eps": 1e-05,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    # meta-llama/Llama-3.1-8B config.json (no head_dim field: 4096 / 32 = 128), llama3 RoPE factor 8.
    "llama-3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "hidden_act": "silu", "rms_norm_eps": 1e-05,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    # meta-llama/Llama-3.1-70B config.json: GQA 64/8 heads of 128, llama3 RoPE factor 8.
    "llama-3.1-70b": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "hidden_act": "silu", "rms_norm_eps": 1e-05,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    # mistralai/Mistral-7B-v0.3 config.json: vocab 32768, sliding_window null (full attention), RoPE 1e6.
    "mistral-7b": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768,
        "max_position_embeddings": 32768, "hidden_act": "silu", "rms_norm_eps": 1e-05, "sliding_window": None,
        "tie_word_embeddings": False, "rope_theta": 1000000.0,
    },
    # Qwen/Qwen2.5-7B config.json: GQA 28/4 heads of 128; Qwen2 has q/k/v biases and no o_proj bias (no
    # attention_bias field); use_sliding_window false.
    "qwen2.5-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "max_position_embeddings": 131072, "hidden_act": "silu", "rms_norm_eps": 1e-06,
        "use_sliding_window": False, "tie_word_embeddings": False, "rope_theta": 1000000.0,
    },
    # Qwen/Qwen3-8B config.json: GQA 32/8 heads of 128, RMSNorm on q and k (Qwen3), rope_scaling null.
    "qwen3-8b": {
        "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "hidden_act": "silu", "rms_norm_eps": 1e-06,
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
        "tie_word_embeddings": False, "rope_scaling": None, "rope_theta": 1000000,
    },
}  # fmt: skip

# Mixture-of-experts models (issue 25), the same way: fields of each repository's config.json, mapped by
# model_keys. Parameter counts (total and per token) are checked in tests/test_presets.py.
PUBLISHED_MOE_CONFIGS: dict[str, dict[str, Any]] = {
    # mistralai/Mixtral-8x7B-v0.1 config.json: 8 experts of 14336, top 2 (renormalised), GQA 32/8, RoPE 1e6.
    "mixtral-8x7b": {
        "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
        "vocab_size": 32000, "max_position_embeddings": 32768, "hidden_act": "silu", "rms_norm_eps": 1e-05,
        "sliding_window": None, "router_aux_loss_coef": 0.02, "tie_word_embeddings": False, "rope_theta": 1000000.0,
    },
    # Qwen/Qwen3-30B-A3B config.json: 128 experts of 768, top 8 (renormalised), every layer sparse, GQA 32/4
    # heads of 128 with q/k RMSNorm.
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "vocab_size": 151936, "max_position_embeddings": 40960, "hidden_act": "silu",
        "rms_norm_eps": 1e-06, "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
        "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "rope_scaling": None, "rope_theta": 1000000.0,
    },
    # allenai/OLMoE-1B-7B-0924 config.json: 64 experts of 1024, top 8 (not renormalised), q/k RMSNorm over the
    # whole projections, clip_qkv null.
    "olmoe-1b-7b": {
        "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
        "norm_topk_prob": False, "vocab_size": 50304, "max_position_embeddings": 4096, "hidden_act": "silu",
        "rms_norm_eps": 1e-05, "attention_bias": False, "clip_qkv": None, "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": False, "rope_scaling": None, "rope_theta": 10000.0,
    },
    # deepseek-ai/DeepSeek-V3 config.json: latent attention (q rank 1536, kv rank 512, heads of 128 + 64 RoPE,
    # values 128), 3 dense layers then 58 of 256 experts of 2048, top 8 within 4 of 8 groups, one shared expert,
    # sigmoid scores with correction bias, scaled 2.5; YaRN x40. Its quantization_config (fp8 weights) is left
    # out: a preset is a shape. Its multi-token prediction module (num_nextn_predict_layers 1, 14B more in the
    # repository's 685B) is not part of the model, as in transformers.
    "deepseek-v3": {
        "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "first_k_dense_replace": 3, "moe_layer_freq": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "num_nextn_predict_layers": 1, "vocab_size": 129280,
        "max_position_embeddings": 163840, "hidden_act": "silu", "rms_norm_eps": 1e-06, "attention_bias": False,
        "tie_word_embeddings": False, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
    },
}  # fmt: skip

# --- presets ------------------------------------------------------------------------------------

MODEL_SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, vocab_size=256),
    # GPT-2 family (Radford et al. 2019): vocab 50257, learned positions sized to the trial's seq_len.
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, vocab_size=50257),
    "gpt2-medium": dict(n_layers=24, d_model=1024, n_heads=16, n_kv_heads=16, vocab_size=50257),
    "gpt2-large": dict(n_layers=36, d_model=1280, n_heads=20, n_kv_heads=20, vocab_size=50257),
    "gpt2-xl": dict(n_layers=48, d_model=1600, n_heads=25, n_kv_heads=25, vocab_size=50257),
    # Real architectures (shapes only; PUBLISHED_CONFIGS above): llama-3.2-1b, llama-3.1-8b, llama-3.1-70b,
    # mistral-7b (v0.3), qwen2.5-7b, qwen3-8b.
    **{name: model_keys(hf, where=f"model.size {name}") for name, hf in PUBLISHED_CONFIGS.items()},
    # Mixture of experts (PUBLISHED_MOE_CONFIGS): mixtral-8x7b, qwen3-30b-a3b, olmoe-1b-7b, deepseek-v3.
    **{name: model_keys(hf, where=f"model.size {name}") for name, hf in PUBLISHED_MOE_CONFIGS.items()},
}

POLICY_PRESETS: dict[str, dict[str, Any]] = {
    "naive": dict(attention="math", remat="none", loss="full"),
    "sdpa": dict(attention="sdpa", remat="none", loss="full"),
    "checkpoint": dict(attention="sdpa", remat="block", loss="full"),
    "selective": dict(attention="sdpa", remat="selective", loss="full"),
    # the least memory at the least time (issue 17): torch's fused attention is already linear in T where
    # it applies (CPU; CUDA flash / memory-efficient), so the blocks recompute with it; until 0.2 this was
    # `chunked` attention, which `policy.attention: chunked` still selects (devices without such a kernel)
    "recompute": dict(attention="sdpa", remat="block", loss="chunked"),
    "planned": dict(attention="sdpa", remat="planned", loss="full"),
    # no preset values: every policy key comes from the file/overrides or the defaults
    "custom": dict(),
}

# Chunk sizes a preset fills in are clamped to the sequence (a preset is a recipe, not a demand);
# chunk sizes a user writes are checked strictly.
CHUNK_KEYS = ("q_chunk", "k_chunk", "loss_chunk")
