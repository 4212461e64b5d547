"""workload.grad_accum: the global batch split into micro-batches whose gradients accumulate before one AdamW
step. The same function as one step over the whole batch (the mean loss and its gradients, to fp32 rounding),
a smaller activation peak, estimated like any step, and refused where it has no meaning."""

from __future__ import annotations

import pytest
import torch

from tests.support import ONE_STEP, config
from txlab.config import ConfigError
from txlab.trial import estimate_trial, run_trial
from txlab.trial.build import build_trial
from txlab.trial.resolve import resolve

BATCH = {**ONE_STEP, "workload.seq_len": 32, "workload.batch_size": 4}


def _grads_and_loss(over: dict) -> tuple[dict[str, torch.Tensor], float]:
    """One training step: the gradients AdamW receives and the step's loss."""
    parts = build_trial(resolve(config({**BATCH, **over})))
    names = {id(p): n for n, p in parts.model.named_parameters()}
    grads: dict[str, torch.Tensor] = {}
    parts.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.update(
            {names[id(p)]: p.grad.detach().clone() for g in opt.param_groups for p in g["params"]}
        )
    )
    loss = float(parts.step(*parts.data.next()))
    return grads, loss


@pytest.mark.parametrize("policy", ["sdpa", "checkpoint", "recompute"])
def test_accumulated_micro_batches_give_the_whole_batchs_loss_and_gradients(policy):
    """The mean of equal micro-batches' mean losses is the whole batch's mean loss, and the sum of their
    gradients scaled by 1/accum is its gradient: equal up to the order of fp32 additions."""
    whole, loss = _grads_and_loss({"policy.name": policy})
    for accum in (2, 4):
        micro, micro_loss = _grads_and_loss({"policy.name": policy, "workload.grad_accum": accum})
        assert micro_loss == pytest.approx(loss, rel=1e-5)
        for name, g in whole.items():
            assert (micro[name] - g).norm() <= 1e-5 * g.norm() + 1e-12, (policy, accum, name)


def test_accumulation_lowers_the_activation_peak_and_the_estimate_follows_it():
    one = run_trial(config({**BATCH, "policy.name": "sdpa"}))
    two = run_trial(config({**BATCH, "policy.name": "sdpa", "workload.grad_accum": 2}))
    assert one["status"] == two["status"] == "ok"
    assert two["activations_bytes"] < one["activations_bytes"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["tokens_per_s"] == pytest.approx(4 * 32 / two["step_time_s"])  # the global batch per step
    est = estimate_trial(config({**BATCH, "policy.name": "sdpa", "workload.grad_accum": 2}), "cpu")
    assert est["status"] == "ok" and abs(est["peak_bytes"] / two["peak_bytes"] - 1) <= 0.05
    assert (
        est["formula_activation_bytes"] * 2
        == estimate_trial(config({**BATCH, "policy.name": "sdpa"}), "cpu")["formula_activation_bytes"]
    )  # the closed form of one micro-batch of 2 sequences


def test_accumulation_under_fsdp_keeps_the_one_device_loss():
    """Two ranks, each accumulating two micro-batches of one sequence: the global batch's loss."""
    one = run_trial(config({**BATCH, "policy.name": "sdpa"}))
    two = run_trial(config({**BATCH, "policy.name": "sdpa", "parallel.fsdp": 2, "workload.grad_accum": 2}))
    assert two["status"] == "ok", two["error"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"workload.grad_accum": 0}, "workload.grad_accum: must be > 0"),
        ({"workload.grad_accum": 3}, r"workload.grad_accum: 3 micro-batches must divide each data-parallel rank's 4"),
        ({"workload.grad_accum": 4, "parallel.fsdp": 2}, r"must divide each data-parallel rank's 2 sequences"),
        ({"workload.grad_accum": 2, "workload.kind": "prefill"}, "workload.kind 'prefill' has none"),
        ({"workload.grad_accum": 2, "policy.name": "planned", "measure.budget_gib": 1}, "plans the step of the whole"),
    ],
)
def test_bad_accumulation_is_refused(over, needle):
    with pytest.raises(ConfigError, match=needle):
        config({**BATCH, **over})
