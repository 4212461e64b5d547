"""The extrapolated estimate (txlab.trial.extrapolate) against the full one, at small shapes: the same peak and
every breakdown column to the byte, the same operator trace op for op (so the same predicted step time), for
every policy and layout; where a model does not repeat, the full run."""

import pytest

from tests.support import config
from txlab.trial.extrapolate import FULL_ENV, extrapolated, find_cut, step_memory
from txlab.trial.predict import predicted
from txlab.trial.resolve import resolve

# 9 blocks of a small Llama-like model: a period of one block repeated 9 > 6 times
SMALL = {
    "model.n_layers": 9,
    "model.d_model": 64,
    "model.n_heads": 4,
    "model.n_kv_heads": 2,
    "model.pos": "rope",
    "model.mlp": "swiglu",
    "model.norm": "rmsnorm",
    "model.tie_weights": False,
    "workload.seq_len": 64,
    "workload.batch_size": 4,
    "measure.hardware": "h100-sxm",
}
MOE = {"model.mlp": "moe", "model.moe_experts": 4, "model.moe_top_k": 2, "model.moe_hidden": 32}

CASES = {
    "sdpa": {"policy.name": "sdpa"},
    "checkpoint": {"policy.name": "checkpoint"},
    "selective": {"policy.name": "selective"},
    "recompute": {"policy.name": "recompute", "policy.loss_chunk": 32},
    "chunked-loss": {"policy.name": "sdpa", "policy.loss": "chunked", "policy.loss_chunk": 32},
    "every-2": {"policy.name": "sdpa", "policy.remat": "every", "policy.remat_every": 2, "model.n_layers": 15},
    "bf16-cuda": {"policy.name": "selective", "workload.dtype": "bf16", "kind": "cuda"},
    "grad-accum": {"policy.name": "checkpoint", "workload.grad_accum": 2},
    "fsdp": {"policy.name": "sdpa", "parallel.fsdp": 2},
    "fsdp-recompute-accum": {
        "policy.name": "recompute",
        "policy.loss_chunk": 32,
        "parallel.fsdp": 2,
        "workload.grad_accum": 2,
    },  # fmt: skip
    "fsdp-tp": {"policy.name": "selective", "parallel.fsdp": 2, "parallel.tp": 2},
    "tp-checkpoint": {"policy.name": "checkpoint", "parallel.tp": 2},
    # context parallelism inside TP: the K/V exchange of each block's local heads over the cp group
    "cp-tp-recompute": {"policy.name": "recompute", "policy.loss_chunk": 16, "parallel.cp": 2, "parallel.tp": 2},
    # DeepSeek-V3's first dense layers, Qwen's sparse step (a period of two blocks)
    "moe-first-dense": {**MOE, "policy.name": "sdpa", "model.moe_first_dense": 2, "model.n_layers": 10},
    "moe-step-2": {**MOE, "policy.name": "checkpoint", "model.moe_every": 2, "model.n_layers": 16},
    "moe-fsdp": {**MOE, "policy.name": "selective", "model.moe_first_dense": 1, "parallel.fsdp": 2},
}


def _setup(over: dict):
    over = dict(over)
    kind = over.pop("kind", "cpu")
    return resolve(config({**SMALL, **over}), estimate=True, kind=kind)


def assert_exact(setup, plan=None) -> None:
    """The extrapolation applies, and its memory, trace and predicted time are the full run's."""
    ex = extrapolated(setup, plan, trace=True)
    assert ex is not None, "the extrapolation fell back"
    full = step_memory(setup, plan, trace=True, full=True)
    assert ex[0] == full[0]  # peak_bytes and every breakdown column, to the byte
    assert ex[2] == full[2]  # every traced operator, in order (collectives' waits included)
    assert ex[1].num_params() == full[1].num_params()  # the model the row's parameter counts are read from
    ours, theirs = predicted(setup, ex[2], None), predicted(setup, full[2], None)
    assert ours.predicted_step_time_s == pytest.approx(theirs.predicted_step_time_s, rel=1e-12, abs=0)
    assert ours.predicted_exposed_comm_s == pytest.approx(theirs.predicted_exposed_comm_s, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("case", list(CASES))
def test_extrapolated_equals_the_full_estimate(case):
    assert_exact(_setup(CASES[case]))


def test_planned_per_block_plan_with_a_period():
    setup = _setup({"policy.name": "planned", "measure.budget_gib": 1.0, "model.n_layers": 25})
    # a period of two units, a recomputed pair and a selective block, 7 times; the first and last blocks differ
    runs = [(0, 1, "keep"), (1, 2, "full")]
    for start in range(2, 23, 3):
        runs += [(start, start + 2, "full"), (start + 2, start + 3, "selective")]
    runs += [(23, 24, "selective"), (24, 25, "keep")]
    assert_exact(setup, runs)


def test_no_period_falls_back_to_the_full_run():
    sqrt = _setup({"policy.name": "sdpa", "policy.remat": "sqrt", "model.n_layers": 30})  # segments 5,5,5,5,5,5
    assert find_cut(sqrt, None) is None or extrapolated(sqrt, None, trace=False) is None
    uneven = _setup({"policy.name": "sdpa", "policy.remat": "sqrt", "model.n_layers": 28})  # 5,6,5,6,...: no cut
    assert find_cut(uneven, None) is None
    assert step_memory(uneven, full=False)[0] == step_memory(uneven, full=True)[0]
    planned = _setup({"policy.name": "planned", "measure.budget_gib": 1.0, "model.n_layers": 12})
    irregular = [(0, 3, "full"), (3, 4, "keep"), (4, 9, "full"), (9, 12, "keep")]
    assert find_cut(planned, irregular) is None


def test_depth_and_environment_choose_the_full_run(monkeypatch):
    calls = []
    monkeypatch.setattr("txlab.trial.extrapolate.extrapolated", lambda *a, **k: calls.append(a))
    shallow = _setup({"policy.name": "sdpa"})  # 9 blocks: under EXTRAPOLATE_FROM
    step_memory(shallow)
    assert calls == []
    deep = _setup({"policy.name": "sdpa", "model.n_layers": 24, "model.d_model": 32, "workload.seq_len": 16})
    monkeypatch.setenv(FULL_ENV, "1")
    step_memory(deep)
    assert calls == []
    monkeypatch.delenv(FULL_ENV)
    step_memory(deep)  # the stub declines: the full run follows
    assert len(calls) == 1


ACCUM_CASES = {
    "sdpa": {"policy.name": "sdpa"},
    "recompute-bf16-cuda": {
        "policy.name": "recompute",
        "policy.loss_chunk": 32,
        "workload.dtype": "bf16",
        "kind": "cuda",
    },
    "fsdp-tp-no-reshard": {
        "policy.name": "selective",
        "parallel.fsdp": 2,
        "parallel.tp": 2,
        "parallel.reshard_after_forward": False,
    },  # fmt: skip
    "cp": {"policy.name": "sdpa", "parallel.cp": 2},
}


@pytest.mark.parametrize("case", list(ACCUM_CASES))
def test_many_micro_steps_from_two_three_and_four_equal_the_full_step(case, monkeypatch):
    """10 micro-steps: the step built from runs of 2, 3 and 4 (txlab.trial.accumulate) is the full step's memory to
    the byte and its trace op for op (so its predicted time), and no run of 10 happened (no fallback)."""
    import txlab.trial.accumulate as acc

    over = {**ACCUM_CASES[case], "model.n_layers": 2}
    dp = over.get("parallel.fsdp", 1)
    setup = _setup({**over, "workload.batch_size": 10 * dp, "workload.grad_accum": 10})
    seen = []
    real = acc.step_memory
    monkeypatch.setattr(acc, "step_memory", lambda s, *a, **k: seen.append(s.workload.grad_accum) or real(s, *a, **k))
    ex = acc.accumulated_step_memory(setup, trace=True)
    assert seen == [2, 3, 4]
    full = step_memory(setup, trace=True, full=True)
    assert ex[0] == full[0]
    assert ex[2] == full[2]
    ours, theirs = predicted(setup, ex[2], None), predicted(setup, full[2], None)
    assert ours.predicted_step_time_s == pytest.approx(theirs.predicted_step_time_s, rel=1e-12, abs=0)


def test_few_micro_steps_leave_the_depth_to_the_extrapolation(monkeypatch):
    """Under ACCUM_FROM micro-steps every micro-step runs, but a deep model is still extrapolated over depth (a
    regression: the whole step at full depth, a 70B estimate 10x slower)."""
    import txlab.trial.accumulate as acc

    calls = []
    monkeypatch.setattr(acc, "step_memory", lambda s, *a, **k: calls.append(k.get("full")) or (None, None, []))
    acc.accumulated_step_memory(_setup({"workload.grad_accum": 4, "workload.batch_size": 4}), trace=True)
    acc.accumulated_step_memory(_setup({"workload.grad_accum": 4, "workload.batch_size": 4}), trace=True, full=True)
    assert calls == [None, True]
