"""Context-parallel trials (`parallel.cp`, with `parallel.fsdp`): N ranks over gloo on this CPU compute what one
process computes (fp32: the same loss, relative <= 1e-5, and the same gradients as AdamW receives them, to
1e-5 of their norm) on a GQA + RoPE + SwiGLU shape and a GPT-2 shape (learned positions), under every
attention kernel and recomputation policy and both losses; the estimate on a fake mesh is rank 0's measured
peak; bad layouts are refused."""

from __future__ import annotations

import pytest
import torch

from tests.support import SHARDED, config
from txlab.config import ConfigError
from txlab.parallel.cp import rank_positions
from txlab.parallel.launch import spawn_ranks
from txlab.trial import estimate_trial, run_trial
from txlab.trial.build import build_trial
from txlab.trial.resolve import resolve

# GQA (4 query heads, 2 KV heads) + RoPE + RMSNorm + SwiGLU, untied output projection, no biases: Llama's shape
LLAMA = {**SHARDED, "model.pos": "rope", "model.norm": "rmsnorm", "model.mlp": "swiglu", "model.n_kv_heads": 2,
         "model.tie_weights": False, "model.attn_bias": False, "model.attn_out_bias": False, "model.mlp_bias": False}  # fmt: skip
# GPT-2's: learned positions, LayerNorm, GELU, biases, tied embeddings
GPT2 = {**SHARDED}
SHAPES = {"llama": LLAMA, "gpt2": GPT2}

# Each rank holds 2 chunks of 8 tokens (seq_len 32, cp 2): q_chunk 4 makes 2 query tiles a chunk
CHUNKED = {"policy.name": "custom", "policy.attention": "chunked", "policy.q_chunk": 4, "policy.k_chunk": 4}


def _steps(rank: int, world: int, configs: list) -> dict:
    """One training step of each config (all of one layout) on rank `rank` (world 1: this process, no process
    group): the loss (the global batch's: the ranks' equal shares averaged), and on rank 0 every gradient
    AdamW receives, gathered whole. One process group for all configs: the ranks start once."""
    import torch.distributed as dist

    from txlab.parallel.fsdp import make_ranks

    torch.set_num_threads(1)
    layout, ranks = resolve(configs[0]).layout, None
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        ranks = make_ranks(rank, layout.fsdp, layout.tp, "cpu", layout.cp)
    out = []
    for c in configs:
        parts = build_trial(resolve(c), ranks=ranks)
        names = {id(p): n for n, p in parts.model.named_parameters()}
        grads = {}

        def record(opt, args, kwargs, names=names, grads=grads):  # a collective: every rank gathers, in order
            for group in opt.param_groups:
                for p in group["params"]:
                    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    grads[names[id(p)]] = g.detach().flatten().tolist()

        parts.optimizer.register_step_pre_hook(record)
        loss = parts.step(*parts.data.next())
        if world > 1:
            dist.all_reduce(loss)
            loss = loss / world
        out.append({"loss": float(loss), "grads": grads if rank == 0 else None})
    if world > 1:
        dist.destroy_process_group()
    return {"steps": out}


def _same_numbers(bases: dict[str, dict], fsdp: int, cp: int) -> None:
    """The layout's trial of each base config (by name) against the one-device trial of it."""
    layout = {"parallel.fsdp": fsdp, "parallel.cp": cp}
    many = spawn_ranks(_steps, fsdp * cp, ([config({**b, **layout}) for b in bases.values()],))
    assert all(isinstance(r, dict) for r in many), many
    for (name, base), got in zip(bases.items(), many[0]["steps"]):
        one = _steps(0, 1, [config(base)])["steps"][0]
        assert abs(got["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"]), (name, got["loss"], one["loss"])
        assert got["grads"].keys() == one["grads"].keys()
        for param, g in one["grads"].items():  # the same gradients, to fp32 rounding of the reductions' order
            a, b = torch.tensor(got["grads"][param]), torch.tensor(g)
            assert a.shape == b.shape and (a - b).norm() <= 1e-5 * b.norm(), (name, param, (a - b).norm() / b.norm())


def test_a_rank_holds_chunks_i_and_2cp_minus_1_minus_i():
    assert rank_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert rank_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([rank_positions(24, 3, r) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))


@pytest.mark.parametrize("fsdp, cp", [(1, 2), (2, 2)])
def test_cp_computes_the_one_device_loss_and_gradients(fsdp, cp):
    bases = {shape: {**base, "policy.name": "sdpa"} for shape, base in SHAPES.items()}
    if fsdp > 1:  # chunked attention's query tiles and micro-steps on the 4-rank mesh too
        bases["llama-chunked-accumulated"] = {**LLAMA, **CHUNKED, "policy.remat": "block", "workload.grad_accum": 2}
    _same_numbers(bases, fsdp, cp)


# A mixture of experts with latent attention (DeepSeek's shape): routing is per token, MLA's keys and values
# are expanded per token before the kernel, so both split over the sequence like any other model
MLA_MOE = {**SHARDED, "model.n_kv_heads": 4, "model.norm": "rmsnorm", "model.pos": "rope", "model.mlp": "moe",
           "model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_hidden": 32, "model.mlp_bias": False,
           "model.attn_bias": False, "model.attn_out_bias": False, "model.attn": "mla", "model.mla_q_rank": 32,
           "model.mla_kv_rank": 16, "model.mla_nope_dim": 16, "model.mla_rope_dim": 8, "model.mla_v_dim": 16,
           "model.moe_first_dense": 1}  # fmt: skip

POLICIES = {
    "llama-recompute": (LLAMA, {"policy.name": "recompute", "policy.loss_chunk": 16}),  # block remat, chunked loss
    "gpt2-checkpoint-chunked-loss": (GPT2, {"policy.name": "checkpoint", "policy.loss": "chunked",
                                            "policy.loss_chunk": 8}),
    "llama-selective": (LLAMA, {"policy.name": "selective"}),
    "gpt2-sqrt-math": (GPT2, {"policy.name": "custom", "policy.remat": "sqrt", "policy.attention": "math"}),
    "llama-every-2": (LLAMA, {"policy.name": "custom", "policy.remat": "every", "policy.remat_every": 2}),
    "llama-chunked": (LLAMA, {**CHUNKED, "policy.remat": "block"}),  # query tiles at their global offsets
    "gpt2-naive": (GPT2, {"policy.name": "naive"}),  # math attention: each chunk's scores materialized
    "llama-accumulated": (LLAMA, {"policy.name": "checkpoint", "workload.grad_accum": 2}),
    "mla-moe-checkpoint": (MLA_MOE, {"policy.name": "checkpoint"}),
}  # fmt: skip


def test_cp_composes_with_every_policy():
    _same_numbers({name: {**shape, **over} for name, (shape, over) in POLICIES.items()}, 1, 2)


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"parallel.cp": 0}, "parallel.cp: must be > 0"),
        ({"parallel.cp": 3}, r"parallel.cp: 2 x 3 chunks must divide workload.seq_len \(32 % 6 != 0: causal load "
                             r"balancing gives each rank two equal chunks\); allowed here: 1, 2, 4, 8, 16"),
        ({"parallel.cp": 2, "parallel.tp": 2}, "parallel.cp: context parallelism with parallel.tp 2 is not built"),
        ({"parallel.cp": 2, "workload.kind": "decode"}, "parallel.cp: sharded trials train"),
        ({"parallel.cp": 2, "policy.name": "planned", "measure.budget_gib": 1}, "parallel.cp: the planner plans one"),
        ({"parallel.cp": 2, "workload.compile": True}, r"workload.compile: not supported with parallel.cp > 1"),
    ],
)  # fmt: skip
def test_bad_cp_layouts_are_refused(over, needle):
    with pytest.raises(ConfigError, match=needle):
        config({**SHARDED, **over})


def test_a_cp_trial_row_has_the_one_device_loss_and_smaller_per_rank_peaks():
    base = {**LLAMA, "workload.seq_len": 128, "policy.name": "checkpoint"}
    one = run_trial(config(base))
    cp = run_trial(config({**base, "parallel.cp": 2}))
    both = run_trial(config({**base, "parallel.fsdp": 2, "parallel.cp": 2}))
    for row in (one, cp, both):
        assert row["status"] == "ok", row["error"]
    for row in (cp, both):
        assert abs(row["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"]), (row["loss"], one["loss"])
        assert row["n_params"] == one["n_params"] and row["parallel.cp"] == 2
        assert row["trial_key"] != one["trial_key"]  # cp set: a new key; cp 1 keeps the key it had
        assert row["activations_bytes"] < one["activations_bytes"]  # half the sequence a rank
        parts = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes",
                 "gathered_params_bytes", "comm_bytes")  # fmt: skip
        assert sum(row[k] for k in parts) == row["peak_bytes"]  # FSDP2 over the cp ranks: its categories
    assert cp["peak_bytes"] < one["peak_bytes"] and both["peak_bytes"] < cp["peak_bytes"]
    # FSDP2 shards parameters and AdamW state over fsdp x cp ranks (the root's stay gathered after forward)
    assert cp["optimizer_bytes"] * 2 == pytest.approx(one["optimizer_bytes"], rel=0.02)
    assert both["optimizer_bytes"] * 4 == pytest.approx(one["optimizer_bytes"], rel=0.03)


def _measured_peaks(rank: int, world: int, configs: list) -> dict:
    """Each config's training steps on this rank of one process group (all configs share a layout)."""
    import torch.distributed as dist

    from txlab.measure.records import Records
    from txlab.parallel.fsdp import make_ranks
    from txlab.trial.train import measure_training

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    layout = resolve(configs[0]).layout
    ranks = make_ranks(rank, layout.fsdp, layout.tp, "cpu", layout.cp)
    peaks = []
    for c in configs:
        rec = Records()
        measure_training(resolve(c), rec, False, ranks)
        peaks.append(rec.memory.peak_bytes)
    dist.destroy_process_group()
    return {"peaks": peaks}


# Activations as large as the rest: 128 tokens (32 a chunk at cp 2), the gathered K/V show at the peak
LONG = {"workload.seq_len": 128}
ESTIMATED_SHAPES = {
    "llama-sdpa": {**LLAMA, **LONG, "policy.name": "sdpa"},
    "llama-recompute": {**LLAMA, **LONG, "policy.name": "recompute", "policy.loss_chunk": 16},
    "llama-chunked": {**LLAMA, **LONG, **CHUNKED, "policy.q_chunk": 16, "policy.k_chunk": 16},
    "gpt2-checkpoint": {**GPT2, **LONG, "policy.name": "checkpoint"},
    "gpt2-selective": {**GPT2, **LONG, "policy.name": "selective"},
    "llama-accumulated": {**LLAMA, **LONG, "policy.name": "checkpoint", "workload.grad_accum": 2},
}


@pytest.mark.parametrize("fsdp, cp", [(1, 2), (2, 2)])
def test_the_estimate_on_a_fake_mesh_matches_the_measured_per_rank_peak(fsdp, cp):
    configs = [config({**shape, "parallel.fsdp": fsdp, "parallel.cp": cp}) for shape in ESTIMATED_SHAPES.values()]
    ranks = spawn_ranks(_measured_peaks, fsdp * cp, (configs,))
    assert all(isinstance(r, dict) for r in ranks), ranks
    for name, c, *measured in zip(ESTIMATED_SHAPES, configs, *(r["peaks"] for r in ranks)):
        estimated = estimate_trial(c, "cpu")
        assert estimated["status"] == "ok" and estimated["measured"] is False, estimated["error"]
        # The estimate is rank 0's. Held to the typical rank, the median, as in tests/test_tp.py (one rank of
        # four has been measured above the others when gloo's asynchronous collectives complete late); the
        # largest is bounded.
        typical = sorted(measured)[(len(measured) - 1) // 2]
        assert abs(estimated["peak_bytes"] - typical) <= 0.05 * typical, (name, estimated["peak_bytes"], measured)
        assert max(measured) <= 1.25 * estimated["peak_bytes"], (name, estimated["peak_bytes"], measured)
