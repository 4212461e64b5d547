"""One measured trial: the row's shape, the tracker's scaling laws, statuses for budget and OOM."""

import math

import pytest
import torch

from tests.support import ONE_STEP, cfg
from txlab.config import load_config
from txlab.results.columns import column_names
from txlab.trial import run_trial


def trial(**over):
    return run_trial(cfg(ONE_STEP, **over))


def test_row_has_every_column_and_sane_figures():
    row = trial(**{"workload__seq_len": 128, "policy__name": "checkpoint"})
    assert set(row) == set(column_names())
    assert row["status"] == "ok" and row["error"] is None and row["measured"] is True
    parts = ["params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes"]
    assert sum(row[p] for p in parts) == row["peak_bytes"] == row["tracked_peak_bytes"]
    n = row["n_params"]
    assert row["params_bytes"] == 4 * n  # fp32, tied embedding counted once
    assert row["optimizer_bytes"] >= 8 * n  # AdamW: two fp32 moments per parameter (+ step counters)
    # In a warm process (the test session) a tiny trial may reuse pages already resident: growth can be 0.
    # tests/test_cli.py checks it is > 0 in a fresh process; test_resident_growth_follows_the_tracked_peak
    # checks it against the tracker on a trial large enough to show.
    assert row["peak_rss_bytes"] >= 0 and row["step_time_s"] > 0 and math.isfinite(row["loss"])
    assert row["tokens_per_s"] == pytest.approx(128 / row["step_time_s"])
    assert row["device"] == "cpu" and row["mfu"] is None and row["reserved_bytes"] is None


def test_resident_growth_follows_the_tracked_peak():
    """The resident high-water mark above the trial's baseline against the tracker's peak.

    Naive attention at 2048 tokens: ~280 MiB tracked, most of it in 64 MiB score tensors, which the C
    allocator maps afresh (above glibc's largest mmap threshold, 32 MiB) and the kernel counts when
    written, however warm the process. The long trial runs first: a high-water mark not reset at the
    start of each trial would carry its peak into the short one.
    """
    long = trial(workload__seq_len=2048, policy__name="naive")
    short = trial(workload__seq_len=512, policy__name="naive")
    assert long["status"] == short["status"] == "ok", (long["error"], short["error"])
    tracked = long["peak_bytes"] - long["params_bytes"]  # the parameters were resident before the window
    assert tracked > 200 * 2**20
    rss_long, rss_short = long["peak_rss_bytes"], short["peak_rss_bytes"]
    assert rss_long >= 0.5 * tracked, (rss_long, tracked)  # measured ~0.95
    assert rss_long > 2 * rss_short, (rss_long, rss_short)  # 16x the scores; measured ~10x
    assert rss_short < tracked, (rss_short, tracked)  # the window's growth, not the process's resident set


def _activations(policy_over: dict, T: int) -> int:
    row = trial(**{"workload__seq_len": T, **{k.replace(".", "__"): v for k, v in policy_over.items()}})
    assert row["status"] == "ok", row["error"]
    return row["activations_bytes"]


def _exponent(policy_over: dict, T1=256, T2=512) -> float:
    return math.log2(_activations(policy_over, T2) / _activations(policy_over, T1))


def test_math_attention_activations_grow_quadratically():
    assert _exponent({"policy.name": "naive"}) > 1.6


@pytest.mark.parametrize(
    "policy",
    [
        {"policy.name": "sdpa"},
        {"policy.name": "custom", "policy.attention": "chunked", "policy.q_chunk": 64, "policy.k_chunk": 64},
    ],
)
def test_fused_and_chunked_activations_grow_linearly(policy):
    assert 0.8 < _exponent(policy) < 1.2


def test_recomputation_holds_less_than_none():
    for attention in ("sdpa", "chunked"):
        tiles = {"policy.q_chunk": 64, "policy.k_chunk": 64} if attention == "chunked" else {}
        base = {"policy.name": "custom", "policy.attention": attention, **tiles}
        none = _activations({**base, "policy.remat": "none"}, 256)
        block = _activations({**base, "policy.remat": "block"}, 256)
        assert block < none * 0.75, (attention, block, none)


def test_over_budget_on_cpu_stops_early():
    row = trial(**{"workload__seq_len": 256, "measure__budget_gib": 0.001})
    assert row["status"] == "over_budget"
    assert "over the budget" in row["error"] and row["peak_bytes"] > 0.001 * 2**30
    assert row["step_time_s"] is None  # stopped before timing


def test_oom_is_a_status_and_the_process_stays_usable(monkeypatch):
    import txlab.trial.build as trial_mod

    real = trial_mod.make_step

    def exploding_step(*args, **kwargs):
        def step(x, y):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        return step

    monkeypatch.setattr(trial_mod, "make_step", exploding_step)
    row = trial(**{"workload__seq_len": 64})
    assert row["status"] == "oom" and "out of memory" in row["error"]
    monkeypatch.setattr(trial_mod, "make_step", real)
    assert trial(**{"workload__seq_len": 64})["status"] == "ok"


def test_cpu_allocation_failure_is_oom(monkeypatch):
    import txlab.trial.build as trial_mod

    def failing_step(*args, **kwargs):
        def step(x, y):
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes"
            )

        return step

    monkeypatch.setattr(trial_mod, "make_step", failing_step)
    assert trial(**{"workload__seq_len": 64})["status"] == "oom"


def test_unexpected_failure_is_an_error_row(monkeypatch):
    import txlab.trial.build as trial_mod

    monkeypatch.setattr(trial_mod, "apply_policy", lambda *a: (_ for _ in ()).throw(ValueError("boom")))
    row = trial(**{"workload__seq_len": 64})
    assert row["status"] == "error" and "ValueError: boom" in row["error"]


def test_bf16_autocast_runs_on_cpu():
    row = trial(**{"workload__seq_len": 64, "workload__dtype": "bf16"})
    assert row["status"] == "ok" and math.isfinite(row["loss"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_budget_is_a_real_cap():
    row = run_trial(
        load_config(
            None,
            {
                "model.size": "gpt2-small",
                "workload.seq_len": 8192,
                "policy.name": "naive",
                "workload.steps": 1,
                "workload.warmup_steps": 0,
                "measure.device": "cuda",
                "measure.budget_gib": 2,
            },
        )
    )
    assert row["status"] == "oom"
    after = run_trial(cfg(ONE_STEP, workload__seq_len=256, measure__device="cuda"))
    assert after["status"] == "ok" and after["reserved_bytes"] >= after["peak_bytes"] > 0
