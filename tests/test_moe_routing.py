"""A mixture of experts' routing in the row: `routing_load` (the busiest expert's pairs over the mean, the
largest over the layers) and `aux_loss` (the load-balancing loss, softmax routers) of the last timed step's
forward, reported apart from `loss`, which stays the language-model loss a dense row reports."""

from __future__ import annotations

import pytest

from tests.support import ONE_STEP, config
from txlab.model.moe import routing_stats
from txlab.trial import estimate_trial, run_trial
from txlab.trial.build import MEMORY_STEPS, build_trial, trial_batches
from txlab.trial.infer import build_model, run_once
from txlab.trial.resolve import resolve

MOE = {**ONE_STEP, "workload.seq_len": 32, "workload.batch_size": 2, "model.norm": "rmsnorm", "model.pos": "rope",
       "model.mlp": "moe", "model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_hidden": 32}  # fmt: skip
SIGMOID = {**MOE, "model.moe_router": "sigmoid", "model.moe_shared": 1}


def _replayed(c) -> tuple[float, tuple[float | None, float | None]]:
    """The trial's steps replayed here (the memory steps, then the timed one): the last loss and routing."""
    parts = build_trial(resolve(c))
    for _ in range(MEMORY_STEPS + c.workload.steps):
        loss = parts.step(*parts.data.next())
    return float(loss), routing_stats(parts.model)


@pytest.mark.parametrize("base", [MOE, SIGMOID], ids=["softmax", "sigmoid"])
def test_the_row_reports_the_last_steps_routing_apart_from_the_language_model_loss(base):
    c = config({**base, "policy.name": "checkpoint"})
    row = run_trial(c)
    assert row["status"] == "ok", row["error"]
    loss, (load, aux) = _replayed(c)
    assert row["loss"] == loss  # the step's loss: the language-model loss, no auxiliary term added
    assert row["routing"] == "measured" and row["routing_load"] == load
    assert 1.0 <= load <= 4 / 2  # balanced .. every token to the same two experts
    if base is MOE:
        assert row["aux_loss"] == aux and aux > 0
    else:
        assert row["aux_loss"] is None  # DeepSeek-V3's sigmoid router defines no such loss


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_an_inference_row_reports_its_last_forwards_routing(kind):
    c = config({**MOE, "workload.kind": kind, "workload.decode_tokens": 3})
    row = run_trial(c)
    assert row["status"] == "ok", row["error"]
    setup = resolve(c)
    model = build_model(setup)
    run_once(model, setup, trial_batches(setup).next()[0], timed=False)  # replayed: prefill (+ 3 decode steps)
    load, aux = routing_stats(model)
    assert row["routing"] == "measured" and row["routing_load"] == load and row["aux_loss"] == aux
    assert 1.0 <= load <= 4 / 2 and aux > 0


def test_dense_rows_have_no_routing():
    row = run_trial(config({**ONE_STEP, "workload.seq_len": 32}))
    assert row["status"] == "ok", row["error"]
    assert row["routing"] is None and row["routing_load"] is None and row["aux_loss"] is None
    assert estimate_trial(config({**ONE_STEP, "workload.seq_len": 32}))["routing"] is None


def test_an_estimated_moe_row_states_its_routing_assumption():
    """Fake tensors cannot route: the row says what the estimate assumed, and measures no load."""
    row = estimate_trial(config(MOE))
    assert row["status"] == "ok" and row["measured"] is False, row["error"]
    assert row["routing"] == "balanced" and row["routing_load"] is None and row["aux_loss"] is None
    skewed = estimate_trial(config({**MOE, "workload.routing_imbalance": 1.5}))
    assert skewed["routing"] == "imbalance 1.5" and skewed["peak_bytes"] == row["peak_bytes"]  # one rank: no effect
