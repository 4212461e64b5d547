"""The config tree: defaults < preset < file < overrides; bad input rejected by key with allowed values."""

import pytest

from txlab.config import (
    MODEL_SIZES,
    POLICY_PRESETS,
    ConfigError,
    TrialConfig,
    all_keys,
    build_config,
    config_from_flat,
    load_config,
    trial_key,
)


def test_defaults_match_design():
    cfg = TrialConfig()
    assert (cfg.model.size, cfg.model.n_layers, cfg.model.d_model, cfg.model.vocab_size) == ("debug", 4, 256, 256)
    assert (cfg.policy.name, cfg.policy.attention, cfg.policy.remat, cfg.policy.loss) == (
        "sdpa",
        "sdpa",
        "none",
        "full",
    )
    assert (cfg.workload.kind, cfg.workload.seq_len, cfg.workload.steps) == ("train", 1024, 3)
    assert cfg.measure.budget_gib is None and cfg.seed == 0


def test_size_preset_then_explicit_keys_win():
    cfg = load_config(None, ["model.size=gpt2-small", "model.n_layers=2"])
    assert cfg.model.d_model == 768 and cfg.model.vocab_size == 50257 and cfg.model.n_layers == 2
    # n_kv_heads follows an explicit n_heads when not given itself
    cfg = load_config(None, ["model.size=gpt2-small", "model.n_heads=8"])
    assert cfg.model.n_kv_heads == 8


@pytest.mark.parametrize("name", [n for n in POLICY_PRESETS if n not in ("planned", "custom")])
def test_policy_presets_fill_keys(name):
    cfg = load_config(None, [f"policy.name={name}", "workload.seq_len=256"])
    for k, v in POLICY_PRESETS[name].items():
        assert getattr(cfg.policy, k) == v


def test_preset_chunks_clamped_to_sequence_but_explicit_chunks_checked():
    cfg = load_config(None, ["policy.name=recompute", "workload.seq_len=128"])
    assert cfg.policy.q_chunk == cfg.policy.k_chunk == cfg.policy.loss_chunk == 128
    with pytest.raises(ConfigError, match=r"policy.loss_chunk: 512 is larger than workload.seq_len \(128\)"):
        load_config(None, ["policy.name=recompute", "workload.seq_len=128", "policy.loss_chunk=512"])
    chunked = ["policy.name=recompute", "policy.attention=chunked", "workload.seq_len=128"]  # 0.1's recompute
    with pytest.raises(ConfigError, match=r"policy.q_chunk: 512 is larger than workload.seq_len \(128\)"):
        load_config(None, [*chunked, "policy.q_chunk=512"])


def test_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {n_layers: 2}\nworkload:\n  seq_len: 64\npolicy.name: checkpoint\n")
    cfg = load_config(p, ["workload.seq_len=128", "seed=3"])
    assert (cfg.model.n_layers, cfg.workload.seq_len, cfg.policy.remat, cfg.seed) == (2, 128, "block", 3)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.n_layer=3"], r"unknown key 'model.n_layer' \(did you mean 'model.n_layers'\?\); allowed: model.size"),
        (["modle.n_layers=3"], r"no section 'modle' \(did you mean 'model'\?\); allowed: data, measure, model"),
        (["model.n_layers=two"], r"model.n_layers: expected an integer, got 'two'"),
        (["model.n_layers=2.5"], r"model.n_layers: expected an integer"),
        (["model.n_layers=0"], r"model.n_layers: must be > 0, got 0"),
        (["model.d_model=-8"], r"model.d_model: must be > 0"),
        (["model.n_heads=3"], r"model.n_heads: must divide model.d_model \(256 % 3 != 0\)"),
        (["model.n_kv_heads=3"], r"model.n_kv_heads: must divide model.n_heads \(4 % 3 != 0\)"),
        (["model.n_kv_heads=8"], r"model.n_kv_heads: must be <= model.n_heads"),
        (["model.size=gpt3"], r"model.size: unknown size 'gpt3'; allowed: debug, gpt2-small"),
        (["model.norm=batchnorm"], r"model.norm: unknown value 'batchnorm'; allowed: layernorm, rmsnorm"),
        (["model.dropout=1.5"], r"model.dropout: must be in \[0, 1\)"),
        (["model.tie_weights=1"], r"model.tie_weights: expected true or false"),
        (["policy.name=fast"], r"policy.name: unknown value 'fast'; allowed: naive, sdpa, checkpoint"),
        (["policy.attention=flash"], r"policy.attention: unknown value 'flash'; allowed: sdpa, math, chunked"),
        (["policy.remat=all"], r"policy.remat: unknown value 'all'; allowed: none, block, every"),
        (["policy.loss=fused"], r"policy.loss: unknown value 'fused'; allowed: full, chunked"),
        (["policy.q_chunk=0"], r"policy.q_chunk: must be > 0, got 0"),
        (
            ["policy.attention=chunked", "policy.k_chunk=4096"],
            r"policy.k_chunk: 4096 is larger than workload.seq_len \(1024\)",
        ),
        (["policy.loss=chunked", "policy.loss_chunk=2048"], r"policy.loss_chunk: 2048 is larger than workload.seq_len"),
        (["policy.remat=every", "policy.remat_every=9"], r"policy.remat_every: 9 is larger than model.n_layers \(4\)"),
        (
            ["policy.name=planned"],
            r"policy.remat: 'planned' chooses what to recompute for measure.budget_gib; set measure.budget_gib",
        ),
        (
            ["model.quant=int4"],
            r"model.quant: 'int4' is inference only .*workload.kind prefill or decode, got workload.kind 'train'",
        ),
        (
            ["workload.kind=prefill", "model.quant=int4", "model.quant_group=96"],
            r"model.quant_group: 96 must be even and divide",
        ),
        (["policy.kv=recompute"], r"policy.kv: 'recompute' applies to workload.kind prefill or decode"),
        (
            ["workload.kind=decode", "model.n_positions=1024"],
            r"workload.decode_tokens: seq_len 1024 \+ decode_tokens 16 is over model.n_positions",
        ),
        (["workload.seq_len=0"], r"workload.seq_len: must be > 0"),
        (["workload.warmup_steps=-1"], r"workload.warmup_steps: must be >= 0"),
        (["workload.dtype=fp64"], r"workload.dtype: unknown value 'fp64'; allowed: fp32, bf16"),
        (["model.n_positions=512"], r"workload.seq_len: 1024 is over model.n_positions \(512\)"),
        (["measure.budget_gib=0"], r"measure.budget_gib: must be > 0"),
        (["measure.budget_gib=-1"], r"measure.budget_gib: must be > 0"),
        (["measure.device=tpu"], r"measure.device: unknown device 'tpu'; allowed: auto, cpu, cuda, cuda:N"),
        (["data.source=wikipedia"], r"data.source: unknown source 'wikipedia'; allowed: synthetic"),
        (["seed=x"], r"seed: expected an integer"),
        (["model=3"], r"unknown key 'model'"),
        (["workload.seq_len"], r"expected KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {n_layers: 2\n")
    with pytest.raises(ConfigError, match=r"malformed YAML at line"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping, got list"):
        load_config(lst)
    with pytest.raises(ConfigError, match="model: must be a mapping"):
        build_config({"model": 3})
    with pytest.raises(ConfigError, match="unknown key 'extra'"):
        build_config({"extra": 1})


def test_trial_key_stable_and_canonical():
    a = load_config(None, ["policy.name=checkpoint"])
    b = load_config(None, {"policy.name": "checkpoint", "policy.remat": "block", "model.size": "debug"})
    assert a.trial_key == b.trial_key == trial_key(a)
    assert len(a.trial_key) == 16
    assert load_config(None, ["seed=1"]).trial_key != load_config(None, ["seed=2"]).trial_key


def test_flat_round_trip():
    cfg = load_config(
        None, ["model.size=gpt2-small", "policy.name=recompute", "workload.seq_len=256", "model.pos=rope"]
    )
    flat = cfg.flat()
    assert list(flat) == all_keys()
    again = config_from_flat(flat)
    assert again == cfg and again.trial_key == cfg.trial_key


def test_every_named_size_builds():
    for size in MODEL_SIZES:
        cfg = load_config(None, [f"model.size={size}"])
        assert cfg.model.d_model % cfg.model.n_heads == 0


def test_exponent_floats_without_a_dot():
    assert load_config(None, ["measure.budget_gib=5e-1"]).measure.budget_gib == 0.5
    assert load_config(None, {"model.dropout": "1E-1"}).model.dropout == 0.1
    with pytest.raises(ConfigError, match="measure.budget_gib: expected a number"):
        load_config(None, ["measure.budget_gib=lots"])
