"""The estimator: fake-tensor predictions against measured CPU peaks, cost at full size, the closed form,
CUDA rounding, statuses and the command line."""

import json
from dataclasses import asdict

import pytest

from tests.support import ONE_STEP, config
from txlab.cli import main
from txlab.config import load_config
from txlab.measure.formula import formula_activation_bytes
from txlab.measure.memory import RssWindow, cuda_block_bytes
from txlab.results.columns import column_names
from txlab.trial import estimate_trial, run_trial
from txlab.trial.fake import fake_step_memory
from txlab.trial.resolve import resolve
from txlab.units import GiB

# A small grid of shapes: lengths, batch, dropout, grouped KV + RoPE + SwiGLU + RMSNorm.
SHAPES = {
    "T96-dropout": {"workload.seq_len": 96, "model.dropout": 0.1},
    "T160-b2-gqa-rope": {
        "workload.seq_len": 160,
        "workload.batch_size": 2,
        "model.n_kv_heads": 2,
        "model.pos": "rope",
        "model.mlp": "swiglu",
        "model.norm": "rmsnorm",
        "model.n_layers": 3,
    },
}
PRESETS = ["naive", "sdpa", "checkpoint", "selective", "recompute"]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("preset", PRESETS + ["recompute+chunked"])
def test_estimate_within_5_percent_of_measured_cpu_peak(preset, shape):
    over = {**SHAPES[shape], "policy.name": preset.split("+")[0]}
    T = over["workload.seq_len"]
    if preset.startswith("recompute"):  # a few loss chunks per sequence
        over["policy.loss_chunk"] = T // 2
    if preset.endswith("+chunked"):  # 0.1's recompute: chunked attention (its fused CPU tiles), a few tiles
        over.update({"policy.attention": "chunked", "policy.q_chunk": T // 2, "policy.k_chunk": T // 2})
    cfg = config({**ONE_STEP, **over})
    measured = run_trial(cfg)
    est = estimate_trial(cfg, "cpu")
    assert measured["status"] == "ok", measured["error"]
    assert est["status"] == "ok", est["error"]
    assert est["measured"] is False and measured["measured"] is True
    err = abs(est["peak_bytes"] / measured["peak_bytes"] - 1)
    assert err <= 0.05, (preset, shape, est["peak_bytes"], measured["peak_bytes"])
    for part in ("params_bytes", "optimizer_bytes"):  # the breakdown is the same kind of figure
        assert est[part] == pytest.approx(measured[part], rel=0.05), part
    assert est["n_params"] == measured["n_params"]
    assert est["formula_activation_bytes"] == measured["formula_activation_bytes"] > 0


BREAKDOWN = ["peak_bytes", "params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes"]


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
@pytest.mark.parametrize("preset", ["naive", "checkpoint", "selective"])
def test_one_steady_step_gives_the_figures_of_the_measured_two(preset, kind):
    """The estimator makes AdamW's state up front and watches one step; replaying the measured run's
    two steps (state made lazily in the first) must give the same figures, byte for byte."""

    cfg = config(
        {**ONE_STEP, "workload.seq_len": 96, "model.dropout": 0.1, "workload.dtype": "bf16", "policy.name": preset}
    )
    steady, replay = (
        asdict(fake_step_memory(resolve(cfg, True, kind), steady=True)[0]),
        asdict(fake_step_memory(resolve(cfg, True, kind), steady=False)[0]),
    )
    assert {k: steady[k] for k in BREAKDOWN} == {k: replay[k] for k in BREAKDOWN}


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
@pytest.mark.parametrize("T,q_chunk,k_chunk,kv_heads", [(250, 32, 16, 2), (192, 16, 48, 4)])
def test_fake_chunked_attention_runs_representative_tiles_with_the_same_figures(
    monkeypatch, T, q_chunk, k_chunk, kv_heads, kind
):
    """On fake tensors the chunked kernel skips tiles that repeat another's allocations; the figures
    must equal those of running every tile. CPU tiles run the fused body; the CUDA estimate models the
    PyTorch-ops body that CUDA runs."""
    import txlab.model.attention as attention

    cfg = config(
        {
            **ONE_STEP,
            "workload.seq_len": T,
            "model.n_kv_heads": kv_heads,
            "policy.name": "recompute",
            "policy.attention": "chunked",  # 0.1's recompute: the preset's own attention is sdpa since 0.2
            "policy.q_chunk": q_chunk,
            "policy.k_chunk": k_chunk,
            "policy.loss_chunk": 64,
        }
    )
    skipped = asdict(fake_step_memory(resolve(cfg, True, kind))[0])
    monkeypatch.setattr(attention, "SKIP_REPEATED_FAKE_TILES", False)
    every = asdict(fake_step_memory(resolve(cfg, True, kind))[0])
    assert {k: skipped[k] for k in BREAKDOWN} == {k: every[k] for k in BREAKDOWN}
    tiles = lambda fake: sum(len(ks) for _, _, ks in attention._tiles(T, q_chunk, k_chunk, fake))  # noqa: E731
    assert tiles(True) <= 6 < tiles(False)
    fused = lambda fake: len(attention._fused_tiles(T, q_chunk, fake))  # noqa: E731
    assert fused(True) <= 3 < fused(False)


def test_estimate_row_has_every_column_and_no_time_figures():
    row = estimate_trial(config({**ONE_STEP, "workload.seq_len": 64}), "cpu")
    assert set(row) == set(column_names())
    assert row["status"] == "ok" and row["error"] is None and row["measured"] is False
    parts = ["params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "other_bytes"]
    assert sum(row[p] for p in parts) == row["peak_bytes"]
    assert row["step_time_s"] is None and row["loss"] is None and row["peak_rss_bytes"] is None


def test_gpt2_xl_at_32k_in_seconds_allocating_little():
    """gpt2-xl at seq_len 32768 would need ~190 GiB with fused attention; predicted on fake tensors."""
    cfg = load_config(None, {"model.size": "gpt2-xl", "workload.seq_len": 32768, "policy.name": "sdpa"})
    with RssWindow() as rss:
        row = estimate_trial(cfg, "cuda", capacity_bytes=80 * GiB)
    assert row["status"] == "over_budget" and "capacity" in row["error"]
    n = row["n_params"]
    assert 1.5e9 < n < 1.7e9
    assert row["params_bytes"] >= 4 * n and row["optimizer_bytes"] >= 8 * n
    assert row["peak_bytes"] > 100 * GiB  # activations of 48 layers x 32k tokens x 1600 wide
    assert rss.peak < 1 * GiB, rss.peak  # bookkeeping only: nothing of that size is allocated
    assert row["duration_s"] < 120, row["duration_s"]  # ~20 s on a busy 2-core machine


def test_cuda_rounding_model():
    assert cuda_block_bytes(1) == 512 and cuda_block_bytes(512) == 512 and cuda_block_bytes(513) == 1024
    assert cuda_block_bytes(3 * 2**20 + 1) == 3 * 2**20 + 512  # from a 20 MiB segment, split
    assert cuda_block_bytes(12 * 2**20 - 4096) == 12 * 2**20  # fresh segment, remainder too small to split
    assert cuda_block_bytes(11 * 2**20 - 4096) == 11 * 2**20 - 4096  # remainder over 1 MiB: split
    cfg = config({**ONE_STEP, "workload.seq_len": 64})
    cpu, cuda = estimate_trial(cfg, "cpu"), estimate_trial(cfg, "cuda")
    assert cuda["peak_bytes"] > cpu["peak_bytes"]  # many small tensors, each rounded up to 512 bytes
    assert cuda["peak_bytes"] % 512 == 0
    assert cuda["params_bytes"] == cpu["params_bytes"] + sum(  # bias vectors of 64 x 4 bytes round to 512
        (-(-p // 512) * 512 - p) for p in _param_sizes(cfg)
    )


def _param_sizes(cfg):
    from txlab.model.gpt import GPT

    return [p.numel() * 4 for p in GPT(cfg.model, cfg.workload.seq_len).parameters()]


def test_over_budget_is_predicted_not_run():
    row = estimate_trial(config({**ONE_STEP, "workload.seq_len": 64, "measure.budget_gib": 0.0001}), "cpu")
    assert row["status"] == "over_budget" and "over the budget" in row["error"]
    assert row["peak_bytes"] > 0.0001 * GiB and row["measured"] is False


def test_formula_matches_the_paper():
    # GPT-3 175B-like layer at 16 bits with dropout: s*b*h*(34 + 5*a*s/h) per layer
    s, b, h, a, L = 2048, 1, 12288, 96, 2
    cfg = load_config(
        None,
        {
            "model.n_layers": L,
            "model.d_model": h,
            "model.n_heads": a,
            "model.dropout": 0.1,
            "workload.seq_len": s,
            "workload.dtype": "bf16",
            "policy.name": "naive",
        },
    )
    # txlab never drops attention probabilities: the paper's a*s^2*b mask term is left out
    assert formula_activation_bytes(cfg.model, cfg.policy, cfg.workload) == L * (s * b * h * 34 + 4 * a * s * s * b)
    fused = load_config(
        None, {**{k: v for k, v in cfg.flat().items() if k.startswith(("model", "workload"))}, "policy.name": "sdpa"}
    )
    assert formula_activation_bytes(fused.model, fused.policy, fused.workload) == L * s * b * h * 34
    full = load_config(
        None,
        {**{k: v for k, v in cfg.flat().items() if k.startswith(("model", "workload"))}, "policy.name": "checkpoint"},
    )
    assert (
        formula_activation_bytes(full.model, full.policy, full.workload) == L * 2 * s * b * h
    )  # the paper's full recomputation: 2sbhL


def test_cli_estimate_json_and_summary(capsys):
    assert main(["estimate", "/dev/null", "--set", "workload.seq_len=64", "--set", "model.n_layers=1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["measured"] is False and row["status"] == "ok" and row["peak_bytes"] > 0
    assert (
        main(
            [
                "estimate",
                "/dev/null",
                "--set",
                "workload.seq_len=64",
                "--set",
                "model.n_layers=1",
                "--capacity-gib",
                "0.001",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "status over_budget" in out and "predicted peak" in out


def test_cli_estimate_bad_input_exits_2(capsys):
    assert main(["estimate", "missing.yaml"]) == 2
    assert main(["estimate", "/dev/null", "--set", "model.nope=1"]) == 2
    assert main(["estimate", "/dev/null", "--capacity-gib", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3


# --- sweeps: estimate mode and the pre-run check (the trial process, without Ray) ----------------------


def test_spec_mode_and_precheck_are_validated():
    from txlab.config import ConfigError
    from txlab.sweeps.spec import parse_spec

    spec = parse_spec({"grid": {"workload.seq_len": [64]}, "mode": "estimate", "precheck": False})
    assert spec.mode == "estimate" and spec.precheck is False
    assert parse_spec({"grid": {"workload.seq_len": [64]}}).mode == "measure"
    with pytest.raises(ConfigError, match="mode: unknown mode 'guess'"):
        parse_spec({"grid": {"workload.seq_len": [64]}, "mode": "guess"})
    with pytest.raises(ConfigError, match="precheck: expected true or false"):
        parse_spec({"grid": {"workload.seq_len": [64]}, "precheck": "yes"})


def _worker(tmp_path, cfg, **job):
    """What the sweep's trial process does with a job (txlab.sweeps.worker.main), in this process."""
    from txlab.sweeps import worker

    config_path, row_path = tmp_path / "config.json", tmp_path / "row.json"
    config_path.write_text(json.dumps({"trial_key": cfg.trial_key, "config": cfg.flat(), **job}))
    assert worker.main([str(config_path), str(row_path)]) == 0
    return json.loads(row_path.read_text())


def test_trial_process_estimates_or_prechecks(tmp_path):
    fits = config({**ONE_STEP, "workload.seq_len": 64})
    over = config({**ONE_STEP, "workload.seq_len": 64, "measure.budget_gib": 0.001})
    est = _worker(tmp_path, fits, mode="estimate")
    assert est["status"] == "ok" and est["measured"] is False and est["step_time_s"] is None
    skipped = _worker(tmp_path, over, mode="measure", precheck=True)  # predicted over budget: not run
    assert skipped["status"] == "over_budget" and skipped["measured"] is False and "(not run)" in skipped["error"]
    ran = _worker(tmp_path, over, mode="measure", precheck=False)  # the spec asks to run it anyway
    assert ran["status"] == "over_budget" and ran["measured"] is True and "tracked memory" in ran["error"]
    assert _worker(tmp_path, fits)["measured"] is True  # an old job file (no mode): measured, prechecked


def test_frontier_estimate_spec_is_an_estimate_sweep_for_80_gib():
    from txlab.sweeps.spec import expand, load_spec

    spec = load_spec("sweeps/frontier_estimate.yaml")
    assert spec.mode == "estimate" and spec.gpu == 0
    trials = expand(spec).trials
    sizes = {t.config.model.size for t in trials}
    assert sizes == {"gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    assert max(t.config.workload.seq_len for t in trials) == 65536
    assert {t.config.measure.budget_gib for t in trials} == {80} and {t.config.measure.device for t in trials} == {
        "cuda"
    }


def test_estimate_mode_trials_run_in_the_actor_and_always_return_a_row():
    from txlab.sweeps.actor import estimate_in_actor

    cfg = config({**ONE_STEP, "workload.seq_len": 64})
    row = estimate_in_actor(cfg.trial_key, cfg.flat(), "s")
    assert row["status"] == "ok" and row["measured"] is False and row["trial_key"] == cfg.trial_key
    wrong = estimate_in_actor("0" * 16, cfg.flat(), "s")  # the node resolves the config to another key
    assert wrong["status"] == "error" and wrong["measured"] is False and "trial key mismatch" in wrong["error"]
