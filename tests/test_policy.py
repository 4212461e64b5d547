"""Exactness, the promise users buy: every attention kernel, recomputation policy, loss mode and
preset gives the reference's loss (rel <= 1e-5) and every parameter's gradient (rel <= 1e-4).

The reference is `math` attention, no recomputation, full loss. Configs are drawn at random (seeded)
over depth, width, heads, grouped KV, RoPE, SwiGLU, RMSNorm, dropout on and off, and odd lengths; seeds
6-9 add the knobs of real architectures (head_dim apart from d_model / n_heads, explicit MLP width, q/k
norms, bias switches, RoPE base and Llama 3.1 scaling).
"""

import random

import pytest
import torch

from tests.support import REFERENCE, config, loss_and_grads

VARIANTS = {
    "sdpa": {"policy.attention": "sdpa"},
    "chunked": {"policy.attention": "chunked", "policy.q_chunk": 8, "policy.k_chunk": 8},
    "chunked-uneven": {"policy.attention": "chunked", "policy.q_chunk": 7, "policy.k_chunk": 5},
    "chunked-one-tile": {"policy.attention": "chunked", "policy.q_chunk": "T", "policy.k_chunk": "T"},
    "remat-block": {"policy.remat": "block"},
    "remat-every-2": {"policy.remat": "every", "policy.remat_every": 2},
    "remat-sqrt": {"policy.remat": "sqrt"},
    "remat-selective": {"policy.remat": "selective"},
    "loss-chunked": {"policy.loss": "chunked", "policy.loss_chunk": 6},
    "preset-naive": {"policy.name": "naive"},
    "preset-sdpa": {"policy.name": "sdpa"},
    "preset-checkpoint": {"policy.name": "checkpoint"},
    "preset-selective": {"policy.name": "selective"},
    "preset-recompute": {"policy.name": "recompute", "policy.loss_chunk": 9},
    "chunked+selective": {
        "policy.attention": "chunked",
        "policy.q_chunk": 6,
        "policy.k_chunk": 6,
        "policy.remat": "selective",
    },
}


def random_model(seed: int) -> tuple[dict, int]:
    rng = random.Random(seed)
    n_heads = rng.choice([2, 4])
    n_kv = rng.choice([h for h in (1, 2, 4) if n_heads % h == 0])
    head_dim = rng.choice([8, 16])
    T = rng.choice([13, 24, 33])
    model = {
        "model.n_layers": rng.choice([1, 2, 3, 4]),
        "model.d_model": n_heads * head_dim,
        "model.n_heads": n_heads,
        "model.n_kv_heads": n_kv,
        "model.vocab_size": rng.choice([50, 97]),
        "model.pos": rng.choice(["learned", "rope"]),
        "model.mlp": rng.choice(["gelu", "swiglu"]),
        "model.norm": rng.choice(["layernorm", "rmsnorm"]),
        "model.dropout": rng.choice([0.0, 0.1]),
        "model.tie_weights": rng.choice([True, False]),
        "workload.seq_len": T,
        "workload.batch_size": rng.choice([1, 2]),
    }
    if seed >= len(GPT_SEEDS):  # real architectures' knobs (Llama, Mistral, Qwen): drawn after the above
        model.update(
            {
                "model.pos": "rope",
                "model.norm": "rmsnorm",
                "model.mlp": "swiglu",
                "model.head_dim": rng.choice([8, 12, 16]),  # independent of d_model / n_heads
                "model.d_model": rng.choice([24, 40]),
                "model.mlp_hidden": rng.choice([20, 56]),
                "model.norm_eps": 1e-5,
                "model.attn_bias": rng.choice([True, False]),
                "model.attn_out_bias": False,
                "model.mlp_bias": False,
                "model.qk_norm": rng.choice([True, False]),
                "model.rope_theta": 500000.0,
                "model.rope_scaling": rng.choice(["none", "llama3"]),
                "model.rope_original_len": 16,
            }
        )
    return model, T


GPT_SEEDS = list(range(6))  # GPT-2-shaped variants (0.1's matrix)
SEEDS = GPT_SEEDS + [6, 7, 8, 9]  # + the knobs of real architectures


@pytest.fixture(scope="module", params=SEEDS, ids=[f"model{s}" for s in SEEDS])
def case(request):
    model, T = random_model(request.param)
    gen = torch.Generator().manual_seed(request.param)
    B, V = model["workload.batch_size"], model["model.vocab_size"]
    x = torch.randint(0, V, (B, T), generator=gen)
    y = torch.randint(0, V, (B, T), generator=gen)
    ref_loss, ref_grads = loss_and_grads(config({**model, **REFERENCE}), x, y)
    return model, T, x, y, ref_loss, ref_grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_loss_and_gradients_as_reference(case, variant):
    model, T, x, y, ref_loss, ref_grads = case
    overrides = {**model, **REFERENCE, **{k: (T if v == "T" else v) for k, v in VARIANTS[variant].items()}}
    if "policy.name" in VARIANTS[variant]:  # presets choose their own kernels: drop the reference's choices
        for k in ("policy.attention", "policy.remat", "policy.loss"):
            overrides.pop(k)
    if overrides.get("policy.remat_every", 1) > overrides["model.n_layers"]:
        pytest.skip("depth 1 has no every-2nd block")
    cfg = config(overrides)
    loss, grads = loss_and_grads(cfg, x, y)
    assert torch.isfinite(loss)
    assert abs(loss - ref_loss).item() <= 1e-5 * abs(ref_loss).item(), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert _rel(g, ref_grads[name]) <= 1e-4, (name, _rel(g, ref_grads[name]))


def test_dropout_is_active_and_seeded():
    """Guards the exactness tests against passing vacuously: dropout really changes the loss,
    and recomputation reproduces the same masks."""
    model, T = random_model(0)
    model.update({"model.dropout": 0.5, "model.n_layers": 2})
    x = torch.randint(0, 50, (1, T))
    y = torch.randint(0, 50, (1, T))
    ref = loss_and_grads(config({**model, **REFERENCE}), x, y)[0]
    other_masks = loss_and_grads(config({**model, **REFERENCE}), x, y, rng_seed=3)[0]
    remat = loss_and_grads(config({**model, **REFERENCE, "policy.remat": "block"}), x, y)[0]
    assert ref != other_masks
    assert torch.equal(ref, remat)


def test_gradient_check_fails_on_a_wrong_policy(monkeypatch):
    """The tolerance is tight enough to catch a kernel that is slightly off."""
    import txlab.model.attention as attention

    model, T = random_model(1)
    model.update({"model.dropout": 0.0, "model.n_kv_heads": model["model.n_heads"]})
    x = torch.randint(0, 50, (1, T))
    y = torch.randint(0, 50, (1, T))
    _, ref = loss_and_grads(config({**model, **REFERENCE}), x, y)

    def leaks_next_token(q, k, v):  # a classic kernel bug: the causal mask one position off
        T = q.shape[-2]
        mask = torch.ones(T, T, dtype=torch.bool).triu(2)
        scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
        return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v

    monkeypatch.setitem(attention.get_attention.__globals__, "sdpa_attention", leaks_next_token)
    _, bad = loss_and_grads(config({**model, **REFERENCE, "policy.attention": "sdpa"}), x, y)
    assert max(_rel(bad[n], ref[n]) for n in ref) > 1e-4
