"""The op-level save policies of `selective` recomputation (txlab.policy.remat.SELECTIVE_POLICIES, chosen by
`policy.selective_save`): each keeps the reference's loss and gradients, they order as they should in
activation memory, and the planner's cost of a selective block follows the chosen policy."""

from __future__ import annotations

import pytest
import torch

from tests.support import NARROW, config
from txlab.model.gpt import GPT
from txlab.policy.apply import apply_policy
from txlab.policy.remat import SELECTIVE_POLICIES, Recomputed

# dropout on: recomputation must replay the same masks
MODEL = {**NARROW, "model.n_kv_heads": 2, "model.dropout": 0.1, "workload.seq_len": 48}


def _run(remat: str, save: str = "txlab"):
    from torch.distributed._tools.mem_tracker import MemTracker

    policy = {"policy.name": "custom", "policy.attention": "sdpa", "policy.loss": "full", "policy.remat": remat}
    cfg = config({**MODEL, **policy, **({"policy.selective_save": save} if remat == "selective" else {})})
    torch.manual_seed(1)
    model = GPT(cfg.model, 48)
    params = dict(model.named_parameters())
    loss_fn = apply_policy(model, cfg.policy)
    assert all(m.save == save for m in model.modules() if isinstance(m, Recomputed))  # the key reached each run
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50, (2, 48), generator=g), torch.randint(0, 50, (2, 48), generator=g)
    torch.manual_seed(2)  # the same dropout masks
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss = loss_fn(model(x), model.lm_head.weight, y)
        saved = tracker.get_tracker_snapshot()[torch.device("cpu")].get(tracker._ref_class.ACT, 0)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params.items()}, saved


@pytest.mark.parametrize("save", list(SELECTIVE_POLICIES))
def test_every_save_policy_is_exact(save):
    ref_loss, ref_grads, _ = _run("none")
    loss, grads, _ = _run("selective", save)
    assert torch.equal(loss, ref_loss)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-7)


def test_save_policies_order_by_what_they_keep():
    """Activations alive at the end of forward: block recomputation < matmuls only < torchtitan (every second
    matmul recomputed) < txlab's list (every matmul and attention) < keeping everything."""
    kept = {name: _run("selective", name)[2] for name in SELECTIVE_POLICIES}
    block, none = _run("block")[2], _run("none")[2]
    assert block < kept["matmuls"] < kept["txlab"] < none
    assert kept["torchtitan"] < kept["txlab"]


def test_an_unknown_save_policy_is_refused():
    with pytest.raises(ValueError, match="unknown selective save policy 'all'"):
        Recomputed([], selective=True, save="all")


def test_the_config_names_exactly_the_save_policies():
    from typing import get_args

    from txlab.config.schema import SelectiveSave

    assert set(get_args(SelectiveSave)) == set(SELECTIVE_POLICIES)


def test_the_default_save_keeps_trial_keys_and_others_change_them():
    base = {**MODEL, "policy.name": "selective"}
    keys = {save: config({**base, "policy.selective_save": save}).trial_key for save in SELECTIVE_POLICIES}
    assert keys["txlab"] == config(base).trial_key  # a store written before the key resumes as is
    assert len(set(keys.values())) == len(keys)


def test_the_planner_prices_a_selective_block_by_its_save_policy():
    """profile_block's selective mode: what it keeps and what it recomputes follow policy.selective_save (txlab
    keeps every matmul and attention output, torchtitan recomputes every second matmul, matmuls-only the
    attention), so a plan's estimate is the policy's, not txlab's list's."""
    from txlab.trial.plan import profile_block

    base = {**MODEL, "model.dropout": 0.0, "policy.name": "planned", "measure.budget_gib": 1.0}
    configs = {save: config({**base, "policy.selective_save": save}) for save in SELECTIVE_POLICIES}
    cost = {save: profile_block(c.model, c.workload, c.policy) for save, c in configs.items()}
    kept = {save: c.kept["selective"] for save, c in cost.items()}
    redo = {save: c.recompute_s["selective"] for save, c in cost.items()}
    assert kept["torchtitan"] < kept["txlab"] and kept["matmuls"] < kept["txlab"]
    assert redo["txlab"] < redo["torchtitan"] and redo["txlab"] < redo["matmuls"]
    assert all(c.recompute_s["selective"] < c.recompute_s["full"] for c in cost.values())
