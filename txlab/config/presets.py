"""Named presets: model sizes (`model.size`) and memory policies (`policy.name`), each a partial config
that explicit keys override.
"""

from __future__ import annotations

from typing import Any

# --- presets ------------------------------------------------------------------------------------

MODEL_SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, vocab_size=256),
    # GPT-2 family (Radford et al. 2019): vocab 50257, learned positions sized to the trial's seq_len.
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, vocab_size=50257),
    "gpt2-medium": dict(n_layers=24, d_model=1024, n_heads=16, n_kv_heads=16, vocab_size=50257),
    "gpt2-large": dict(n_layers=36, d_model=1280, n_heads=20, n_kv_heads=20, vocab_size=50257),
    "gpt2-xl": dict(n_layers=48, d_model=1600, n_heads=25, n_kv_heads=25, vocab_size=50257),
}

POLICY_PRESETS: dict[str, dict[str, Any]] = {
    "naive": dict(attention="math", remat="none", loss="full"),
    "sdpa": dict(attention="sdpa", remat="none", loss="full"),
    "checkpoint": dict(attention="sdpa", remat="block", loss="full"),
    "selective": dict(attention="sdpa", remat="selective", loss="full"),
    "recompute": dict(attention="chunked", remat="block", loss="chunked"),
    "planned": dict(attention="sdpa", remat="planned", loss="full"),
    # no preset values: every policy key comes from the file/overrides or the defaults
    "custom": dict(),
}

# Chunk sizes a preset fills in are clamped to the sequence (a preset is a recipe, not a demand);
# chunk sizes a user writes are checked strictly.
CHUNK_KEYS = ("q_chunk", "k_chunk", "loss_chunk")
