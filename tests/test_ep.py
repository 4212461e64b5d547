"""Expert-parallel trials (`parallel.ep` of the `parallel.fsdp` ranks): N ranks over gloo on this CPU compute
what one process computes (fp32: the same loss, relative <= 1e-5, and the same gradients as AdamW receives
them, to 1e-5 of their norm) on a Mixtral-like and a DeepSeek-V3-like mixture of experts, under recomputation
policies; the row's loss and routing equal the one-device row's."""

from __future__ import annotations

import pytest
import torch

from tests.support import SHARDED, assert_same_steps, config
from txlab.parallel.ep import received_rows
from txlab.parallel.launch import spawn_ranks
from txlab.trial import estimate_trial, run_trial
from txlab.trial.resolve import resolve

# Mixtral's shape: softmax top 2 of 4 renormalised, RoPE, RMSNorm, no biases
MIXTRAL = {**SHARDED, "model.pos": "rope", "model.norm": "rmsnorm", "model.attn_bias": False,
           "model.attn_out_bias": False, "model.mlp_bias": False, "model.tie_weights": False, "model.mlp": "moe",
           "model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_hidden": 32}  # fmt: skip
# DeepSeek-V3's: latent attention, a dense first layer, sigmoid scores with groups, a shared expert, scaled
DEEPSEEK = {**MIXTRAL, "model.n_layers": 3, "model.attn": "mla", "model.mla_q_rank": 32, "model.mla_kv_rank": 16,
            "model.mla_nope_dim": 16, "model.mla_rope_dim": 8, "model.mla_v_dim": 16, "model.moe_router": "sigmoid",
            "model.moe_groups": 2, "model.moe_topk_groups": 1, "model.moe_shared": 1, "model.moe_scale": 2.5,
            "model.moe_first_dense": 1}  # fmt: skip
SHAPES = {"mixtral": MIXTRAL, "deepseek": DEEPSEEK}


def _same_numbers(base: dict, fsdp: int, ep: int) -> None:
    """The layout's step of `base` against the one-device step of `base` (the experts' gradients among them)."""
    (step,) = assert_same_steps({"base": base}, {"parallel.fsdp": fsdp, "parallel.ep": ep})
    assert any(".experts." in name for name in step["grads"])


@pytest.mark.parametrize("shape", SHAPES)
def test_ep_computes_the_one_device_loss_and_gradients(shape):
    _same_numbers({**SHAPES[shape], "policy.name": "sdpa"}, 2, 2)


@pytest.mark.parametrize(
    "shape, over",
    [
        ("mixtral", {"policy.name": "sdpa"}),
        ("deepseek", {"policy.name": "selective"}),
        # one expert a rank, FSDP2 over 2: sharded along its rows (dim 0 would leave a rank only padding)
        ("mixtral", {"policy.name": "sdpa", "model.moe_experts": 2, "model.moe_top_k": 1}),
    ],
    ids=["mixtral", "deepseek-selective", "one-expert-a-rank"],
)
def test_fsdp_4_x_ep_2_shards_the_experts_further_and_computes_the_one_device_step(shape, over):
    """Each expert on 2 of the 4 ranks, FSDP2 over those 2 (its gradient: the ep group's sum / ep, then FSDP's
    mean over the 2)."""
    _same_numbers({**SHAPES[shape], **over}, 4, 2)


@pytest.mark.parametrize(
    "over",
    [
        {"policy.name": "checkpoint"},  # the block recomputed in backward: its all-to-alls again
        {"policy.name": "selective"},  # the expert matmuls' outputs kept
        {"policy.name": "recompute", "policy.loss_chunk": 16},  # chunked attention and loss, block remat
        {"policy.name": "sdpa", "workload.grad_accum": 2},  # micro-steps: the expert gradients accumulated
    ],
    ids=["checkpoint", "selective", "recompute", "accumulated"],
)
def test_ep_composes_with_recomputation(over):
    _same_numbers({**DEEPSEEK, **over}, 2, 2)


def test_an_ep_trial_row_has_the_one_device_loss_and_routing():
    base = {**MIXTRAL, "policy.name": "checkpoint", "workload.steps": 2}
    one = run_trial(config(base))
    ep = run_trial(config({**base, "parallel.fsdp": 2, "parallel.ep": 2}))
    for row in (one, ep):
        assert row["status"] == "ok", row["error"]
    assert abs(ep["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"]), (ep["loss"], one["loss"])
    assert ep["n_params"] == one["n_params"] and ep["n_active_params"] == one["n_active_params"]
    assert ep["routing"] == "measured" and ep["routing_load"] == pytest.approx(one["routing_load"], rel=1e-12)
    assert ep["aux_loss"] == pytest.approx(one["aux_loss"], rel=1e-5)
    assert ep["parallel.ep"] == 2 and ep["trial_key"] != one["trial_key"]
    assert ep["params_bytes"] < one["params_bytes"]


# --- the estimate: rank 0 on a fake mesh, routed by assumption ------------------------------------------------


def _balanced_router(monkeypatch=None) -> None:
    """A test-only router whose choice is exactly balanced (token i to experts i k .. i k + k - 1, mod E), its
    weights still the softmax's: then every EP rank receives what the estimate's balanced assumption says, and
    the measured and estimated steps have the same shapes."""
    import torch.nn.functional as F

    from txlab.model.moe import Router

    def forward(self, x):
        scores = F.linear(x, self.weight).float().softmax(dim=-1)  # (N, E)
        n = torch.arange(x.shape[0], device=x.device)[:, None]
        experts = (n * self.top_k + torch.arange(self.top_k, device=x.device)) % self.n_experts  # (N, k)
        return scores.gather(1, experts), experts, scores

    if monkeypatch is not None:
        monkeypatch.setattr(Router, "forward", forward)
    else:
        Router.forward = forward


def _measured_peaks(rank: int, world: int, configs: list) -> dict:
    """Each config's training steps on this rank of one process group, routed by `_balanced_router`."""
    import torch.distributed as dist

    from txlab.measure.records import Records
    from txlab.parallel.fsdp import make_ranks
    from txlab.trial.train import measure_training

    torch.set_num_threads(1)
    _balanced_router()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    layout = resolve(configs[0]).layout
    ranks = make_ranks(rank, layout.fsdp, layout.tp, "cpu")
    peaks, loads = [], []
    for c in configs:
        rec = Records()
        measure_training(resolve(c), rec, False, ranks)
        peaks.append(rec.memory.peak_bytes)
        loads.append(rec.routing.routing_load)
    dist.destroy_process_group()
    return {"peaks": peaks, "loads": loads}


ESTIMATED = {
    "mixtral-sdpa": {**MIXTRAL, "policy.name": "sdpa", "model.moe_hidden": 128},
    "deepseek-checkpoint": {**DEEPSEEK, "policy.name": "checkpoint", "model.moe_hidden": 128},
    "deepseek-recompute": {**DEEPSEEK, "policy.name": "recompute", "policy.loss_chunk": 16, "model.moe_hidden": 128},
}


def test_the_estimate_of_balanced_routing_matches_the_measured_per_rank_peak(monkeypatch):
    layout = {"parallel.fsdp": 2, "parallel.ep": 2}
    configs = [config({**shape, **layout}) for shape in ESTIMATED.values()]
    ranks = spawn_ranks(_measured_peaks, 2, (configs,))
    assert all(isinstance(r, dict) for r in ranks), ranks
    assert all(load == 1.0 for r in ranks for load in r["loads"])  # the routing the estimate assumes
    _balanced_router(monkeypatch)  # the same router's temporaries in the estimate
    for name, c, *measured in zip(ESTIMATED, configs, *(r["peaks"] for r in ranks)):
        estimated = estimate_trial(c, "cpu")
        assert estimated["status"] == "ok" and estimated["measured"] is False, estimated["error"]
        assert estimated["routing"] == "balanced" and estimated["routing_load"] is None
        got = estimated["peak_bytes"]
        assert abs(got - measured[0]) <= 0.05 * measured[0], (name, got, measured)


def test_an_imbalance_grows_what_an_ep_rank_receives():
    """The busiest expert at 2x the mean on rank 0 of ep 2 with 4 experts: rank 0 receives 4/3 of the rows (2 m
    for it, 2 m / 3 for its neighbour: the other three share the rest)."""
    assert received_rows(1000, 1.0, 2, 4) == 1000 and received_rows(1000, 2.0, 2, 4) == 1333
    assert received_rows(1000, 2.0, 4, 4) == 2000 and received_rows(1000, 3.0, 1, 4) == 1000  # one rank: no effect
    base = {**ESTIMATED["mixtral-sdpa"], "parallel.fsdp": 2, "parallel.ep": 2, "workload.seq_len": 256}
    balanced = estimate_trial(config(base), "cpu")
    skewed = estimate_trial(config({**base, "workload.routing_imbalance": 2.0}), "cpu")
    assert skewed["routing"] == "imbalance 2" and balanced["routing"] == "balanced"
    assert skewed["activations_bytes"] > balanced["activations_bytes"]
    one = estimate_trial(config({**ESTIMATED["mixtral-sdpa"], "workload.routing_imbalance": 2.0}), "cpu")
    assert one["peak_bytes"] == estimate_trial(config(ESTIMATED["mixtral-sdpa"]), "cpu")["peak_bytes"]
