"""Tensor-parallel trials (`parallel.tp`, with `parallel.fsdp`): N ranks over gloo on this CPU compute what one
process computes (fp32: the same loss, relative <= 1e-5, and the same gradients as AdamW receives them, to
1e-5 of their norm) on a GQA + RoPE + SwiGLU shape and a GPT-2 shape (learned positions, LayerNorm, GELU,
biases, tied embeddings, a vocabulary TP does not divide), with and without sequence parallelism, under
every recomputation policy and both losses; TP shares the memory it should; bad layouts are refused."""

from __future__ import annotations

import pytest

from tests.support import (
    GPT2_SHARDED,
    LLAMA_SHARDED,
    SHARDED,
    assert_estimates_match_measured,
    assert_same_steps,
    config,
)
from txlab.config import ConfigError
from txlab.trial import run_trial

LLAMA, GPT2 = LLAMA_SHARDED, GPT2_SHARDED
SHAPES = {"llama": LLAMA, "gpt2": GPT2}


def _same_numbers(base: dict, fsdp: int, tp: int, sequence_parallel: bool = True) -> None:
    """The layout's trial of `base` against the one-device trial of `base`."""
    assert_same_steps({"base": base}, {"parallel.fsdp": fsdp, "parallel.tp": tp,
                                       "parallel.sequence_parallel": sequence_parallel})  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fsdp, tp", [(1, 2), (2, 2)])
def test_tp_computes_the_one_device_loss_and_gradients(shape, fsdp, tp):
    _same_numbers({**SHAPES[shape], "policy.name": "sdpa"}, fsdp, tp)


def test_fsdp_x_tp_with_gradient_accumulation_computes_the_one_device_step():
    _same_numbers({**GPT2, "policy.name": "recompute", "policy.loss_chunk": 16, "workload.grad_accum": 2}, 2, 2)


@pytest.mark.parametrize(
    "shape, over",
    [
        ("llama", {"sequence_parallel": False}),
        ("gpt2", {"sequence_parallel": False}),
        ("llama", {"policy.name": "recompute", "policy.loss_chunk": 16}),  # chunked attention and loss, block remat
        ("gpt2", {"policy.name": "checkpoint", "policy.loss": "chunked", "policy.loss_chunk": 8}),
        ("llama", {"policy.name": "selective"}),
        ("gpt2", {"policy.name": "custom", "policy.remat": "sqrt", "policy.attention": "math"}),
        ("llama", {"policy.name": "custom", "policy.remat": "every", "policy.remat_every": 2}),
        ("llama", {"policy.name": "checkpoint", "workload.grad_accum": 2}),  # micro-steps under TP's loss context
    ],
)
def test_tp_composes_with_every_policy(shape, over):
    keys = {k: v for k, v in over.items() if k != "sequence_parallel"}
    _same_numbers({**SHAPES[shape], "policy.name": "sdpa", **keys}, 1, 2, over.get("sequence_parallel", True))


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"parallel.tp": 0}, "parallel.tp: must be > 0"),
        ({"parallel.tp": 3}, r"parallel.tp: 3 must divide model.n_heads \(4 % 3 != 0: each rank takes whole heads\); "
                             "allowed here: 1, 2, 4"),
        ({"parallel.tp": 4, "model.n_kv_heads": 2}, r"parallel.tp: 4 must divide model.n_kv_heads .*not replicated"),
        ({"parallel.tp": 2, "model.mlp_hidden": 63}, r"parallel.tp: 2 must divide MLP width \(63 % 2"),
        ({"parallel.tp": 4, "workload.seq_len": 30, "model.n_heads": 4}, r"must divide workload.seq_len \(30 % 4"),
        ({"parallel.sequence_parallel": False}, "parallel.sequence_parallel: .* but parallel.tp is 1"),
        ({"parallel.tp": 2, "model.dropout": 0.1}, "model.dropout: 0.1 with parallel.tp > 1 is not built"),
        ({"parallel.tp": 2, "model.qk_norm": True}, "model.qk_norm: not supported with parallel.tp > 1"),
        ({"parallel.tp": 2, "workload.kind": "decode"}, "parallel.tp: sharded trials train"),
        ({"parallel.tp": 2, "policy.name": "planned", "measure.budget_gib": 1}, "parallel.tp: the planner plans one"),
        ({"parallel.tp": 2, "parallel.fsdp": 2, "measure.device": "cuda:1"}, r"the 4 ranks of parallel.fsdp run on"),
    ],
)  # fmt: skip
def test_bad_tp_layouts_are_refused(over, needle):
    with pytest.raises(ConfigError, match=needle):
        config({**SHARDED, **over})


def test_seq_len_need_not_divide_without_sequence_parallelism():
    config({**SHARDED, "workload.seq_len": 30, "parallel.tp": 2, "parallel.sequence_parallel": False})


def test_a_tp_trial_row_has_the_one_device_loss_and_smaller_per_rank_peaks():
    base = {**LLAMA, "policy.name": "checkpoint", "workload.steps": 2}
    one = run_trial(config(base))
    tp = run_trial(config({**base, "parallel.tp": 2}))
    both = run_trial(config({**base, "parallel.fsdp": 2, "parallel.tp": 2}))
    for row in (one, tp, both):
        assert row["status"] == "ok", row["error"]
    for row in (tp, both):
        assert abs(row["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"])
        assert row["n_params"] == one["n_params"] and row["parallel.tp"] == 2
        assert row["trial_key"] != one["trial_key"]  # tp set: a new key; tp 1 keeps the 0.2 key
    assert tp["peak_bytes"] < one["peak_bytes"] and both["peak_bytes"] < tp["peak_bytes"]
    # TP splits parameters, gradients and AdamW state in two (the norms' weights are whole on every rank)
    assert tp["optimizer_bytes"] * 2 == pytest.approx(one["optimizer_bytes"], rel=0.02)
    assert both["optimizer_bytes"] * 4 == pytest.approx(one["optimizer_bytes"], rel=0.03)
    parts = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes")
    assert sum(tp[k] for k in parts) == tp["peak_bytes"] and tp["gathered_params_bytes"] is None  # no FSDP
    assert sum(both[k] for k in (*parts, "gathered_params_bytes", "comm_bytes")) == both["peak_bytes"]


ESTIMATED_SHAPES = {
    "llama-sdpa": {**LLAMA, "policy.name": "sdpa"},
    "llama-recompute": {**LLAMA, "policy.name": "recompute", "policy.loss_chunk": 16},
    "gpt2-checkpoint": {**GPT2, "policy.name": "checkpoint"},
    "gpt2-selective": {**GPT2, "policy.name": "selective"},
    # the logits as large as everything else: the full loss's vocabulary-parallel softmax shows at the peak
    "gpt2-large-vocabulary": {**GPT2, "policy.name": "sdpa", "model.vocab_size": 4099},
    "llama-accumulated": {**LLAMA, "policy.name": "checkpoint", "workload.grad_accum": 2},
}


@pytest.mark.parametrize("fsdp, tp, sp", [(1, 2, True), (1, 2, False), (2, 2, True)])
def test_the_estimate_on_a_fake_mesh_matches_the_measured_per_rank_peak(fsdp, tp, sp):
    assert_estimates_match_measured(
        ESTIMATED_SHAPES, {"parallel.fsdp": fsdp, "parallel.tp": tp, "parallel.sequence_parallel": sp}
    )
