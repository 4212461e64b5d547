"""Prefill / decode trials on real checkpoints (`model.init: pretrained`): small random Llama and Qwen3
models built with transformers' own classes (no download) and saved as safetensors, as in tests/test_hf.py.

- A decode trial under every KV policy generates transformers' own greedy tokens
  (`generate(ids, do_sample=False)`) from the same prompt: the checkpoint's weights, RoPE positions
  past the prompt (Llama 3.1 scaling reached), GQA, Qwen3's q/k norms and head_dim != d_model / n_heads.
- An int4 trial's logit error and next-token agreement are measured against the same checkpoint at
  full precision: they equal the figures computed by hand against transformers' logits of that
  checkpoint, and change with the checkpoint's weights.
"""

from __future__ import annotations

import pytest
import torch

from txlab.config import build_config
from txlab.model.decode import kv_cache_analytic_bytes
from txlab.trial import run_trial
from txlab.trial.build import trial_batches
from txlab.trial.infer import build_model, run_once
from txlab.trial.resolve import resolve

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)

V, PROMPT, NEW = 101, 20, 8
CPU = torch.device("cpu")
# Llama 3.1's RoPE scaling with a short original context, so the scaled band reaches the generated positions
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}  # fmt: skip
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
              max_position_embeddings=128, rms_norm_eps=1e-5, num_key_value_heads=2)  # fmt: skip


def _hf_model(family: str, seed: int):
    t = transformers
    torch.manual_seed(seed)
    if family == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**COMMON, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False))
    else:  # head_dim 32, not 64 / 4: the K/V rows of the projection are not d_model wide
        model = t.Qwen3ForCausalLM(t.Qwen3Config(**COMMON, head_dim=32))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norm weights away from ones, so an ignored norm (q/k norm too) changes the tokens
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.float().eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(family, seed) -> (transformers model, checkpoint directory); seed 1: the same shape, other weights."""
    out = {}
    for family in ("llama", "qwen3"):
        for seed in (0, 1):
            model = _hf_model(family, seed)
            directory = tmp_path_factory.mktemp(f"{family}{seed}")
            model.save_pretrained(directory, safe_serialization=True)
            out[(family, seed)] = model, directory
    return out


def _cfg(directory, **over):
    tree = {
        "model": {"hf": str(directory), "init": "pretrained"},
        "workload": {"kind": "decode", "seq_len": PROMPT, "decode_tokens": NEW, "batch_size": 2, "steps": 1,
                     "warmup_steps": 0},
        "measure": {"device": "cpu"},
    }  # fmt: skip
    if over.get("policy__kv") == "recompute":  # several tiles of recomputed K/V per step
        tree["policy"] = {"k_chunk": 8}
    for key, value in over.items():
        section, name = key.split("__")
        tree.setdefault(section, {})[name] = value
    return build_config(tree)


def _trial_tokens(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The trial's prompt (its own synthetic batch) and the greedy tokens its decode run generates."""
    setup = resolve(cfg)
    prompt = trial_batches(setup).next()[0]
    run = run_once(build_model(setup), setup, prompt, timed=False, keep_tokens=True)
    return prompt, torch.stack(run.tokens, dim=1)  # (B, NEW + 1): after the prompt, then after each step


def _hf_greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():  # no end-of-sequence stop: every row runs the n steps
        out = model.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, prompt.shape[1] :]


@pytest.mark.parametrize("kv", ["cache", "grouped", "recompute"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decode_trial_generates_transformers_greedy_tokens(checkpoints, family, kv):
    hf, directory = checkpoints[(family, 0)]
    prompt, ours = _trial_tokens(_cfg(directory, policy__kv=kv))
    theirs = _hf_greedy(hf, prompt, NEW + 1)
    assert theirs.shape == ours.shape == (2, NEW + 1)
    assert torch.equal(ours, theirs), (family, kv, ours.tolist(), theirs.tolist())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_pretrained_decode_trial_row(checkpoints, family):
    hf, directory = checkpoints[(family, 0)]
    row = run_trial(_cfg(directory))
    assert row["status"] == "ok", row["error"]
    assert row["n_params"] == hf.num_parameters()
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert row["kv_cache_bytes"] == kv_cache_analytic_bytes(
        c.num_hidden_layers, c.num_key_value_heads, head_dim, PROMPT + NEW, 4, batch=2
    )


def _rel_error_by_hand(cfg, hf) -> tuple[float, float]:
    """int4 txlab logits against transformers' full-precision logits of a checkpoint, on the trial's prompt."""
    prompt = trial_batches(resolve(cfg)).next()[0]
    with torch.no_grad():
        lq, lr = build_model(resolve(cfg)).logits(prompt), hf(prompt).logits
    return ((lq - lr).norm() / lr.norm()).item(), (lq.argmax(-1) == lr.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_int4_error_is_against_the_same_checkpoint(checkpoints, family):
    rows, by_hand = {}, {}
    for seed in (0, 1):
        hf, directory = checkpoints[(family, seed)]
        cfg = _cfg(directory, model__quant="int4", model__quant_group=32, workload__kind="prefill")
        rows[seed] = row = run_trial(cfg)
        assert row["status"] == "ok", row["error"]
        by_hand[seed] = _rel_error_by_hand(cfg, hf)
        err, agree = by_hand[seed]
        # the trial's reference is this checkpoint at full precision: transformers' logits of it, within fp32
        assert row["logit_rel_error"] == pytest.approx(err, rel=1e-3)
        assert row["next_token_agreement"] == pytest.approx(agree, abs=1 / (2 * PROMPT))  # one near-tie at most
        assert 0 < row["logit_rel_error"] < 0.3  # small (int4 of random weights) and nonzero
        assert row["next_token_agreement"] > 0.5
    assert rows[0]["logit_rel_error"] != rows[1]["logit_rel_error"]  # the weights changed, so did the error
    # against another checkpoint's full-precision logits (what a fresh random init would give) it is not small
    cfg0 = _cfg(checkpoints[(family, 0)][1], model__quant="int4", model__quant_group=32, workload__kind="prefill")
    assert _rel_error_by_hand(cfg0, checkpoints[(family, 1)][0])[0] > 0.5


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_int4_decode_recomputed_keys_match_the_cache(checkpoints, family):
    """Under int4 the recompute policy dequantizes only the K/V rows of each qkv projection (rows from
    n_heads * head_dim on, head_dim 32 on Qwen3): its tokens are the int4 cache's."""
    _, directory = checkpoints[(family, 0)]
    int4 = {"model__quant": "int4", "model__quant_group": 32}
    _, cached = _trial_tokens(_cfg(directory, policy__kv="cache", **int4))
    _, recomputed = _trial_tokens(_cfg(directory, policy__kv="recompute", **int4))
    assert torch.equal(cached, recomputed)
