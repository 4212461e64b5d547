"""Sweep specs: parsing, the skip_if language, grid expansion, validation, and every shipped spec (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support import TINY_BASE
from txlab.cli import main
from txlab.config import ConfigError
from txlab.sweeps.dry_run import format_dry_run
from txlab.sweeps.plan import plan
from txlab.sweeps.spec import SkipRule, expand, load_spec, parse_spec

SPECS = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))


def spec_of(**raw):
    raw.setdefault("name", "t")
    raw.setdefault("base", TINY_BASE)
    return parse_spec(raw, path="t.yaml")


def write(tmp_path: Path, raw: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


# --- shipped specs ------------------------------------------------------------------------------


def test_every_shipped_spec_is_there():
    names = {p.stem for p in SPECS}
    assert {"smoke", "long_context", "gpt2_mem", "attention_chunks"} <= names


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_spec_loads_and_dry_runs(path, tmp_path, capsys):
    spec = load_spec(path)
    e = expand(spec)
    assert e.trials, f"{path.name}: no trials"
    assert len(e.trials) + len(e.skipped) + len(e.duplicates) == spec.grid_size
    assert len({t.key for t in e.trials}) == len(e.trials)
    assert main(["sweep", str(path), "--store", str(tmp_path / "store"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{len(e.trials)} trials" in out and "all trial configs valid" in out
    assert sum(line.startswith("  skipped ") for line in out.splitlines()) == len(e.skipped)
    assert not (tmp_path / "store").exists(), "a dry run must not create the store"


def test_smoke_spec_exercises_statuses():
    spec = load_spec(next(p for p in SPECS if p.stem == "smoke"))
    e = expand(spec)
    assert spec.gpu == 0 and spec.cpu >= 1
    budgets = {t.config.measure.budget_gib for t in e.trials}
    assert any(b is not None for b in budgets), "smoke must hold an over-budget case"
    assert e.skipped, "smoke shows skip_if at work"
    assert {t.config.model.size for t in e.trials} == {"debug"}


def test_long_context_spec_is_the_design_example():
    spec = load_spec(next(p for p in SPECS if p.stem == "long_context"))
    assert spec.gpu > 0 and spec.base["measure"]["budget_gib"] == 80
    assert {"model.n_layers", "workload.seq_len", "policy.name"} <= set(spec.grid)


# --- spec errors: one line naming the key ---------------------------------------------------------


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"grid": {"workload.seq_len": [64]}, "gird": 1}, "unknown spec key 'gird'"),
        ({"grid": {}}, "grid: expected a non-empty mapping"),
        ({}, "grid: expected a non-empty mapping"),
        (
            {"grid": {"workload.seqlen": [64]}},
            "'workload.seqlen' is not a config key (did you mean 'workload.seq_len'?)",
        ),
        ({"grid": {"workload.seq_len": []}}, "grid.workload.seq_len: empty list"),
        ({"grid": {"workload.seq_len": [64, 64]}}, "grid.workload.seq_len: repeated value"),
        ({"grid": {"workload.seq_len": [{"a": 1}]}}, "grid.workload.seq_len: values must be scalars"),
        ({"grid": {"workload.seq_len": [64]}, "resources": {"tpu": 1}}, "unknown resource 'tpu'"),
        ({"grid": {"workload.seq_len": [64]}, "resources": {"cpu": 0}}, "resources.cpu: expected a number > 0"),
        (
            {"grid": {"workload.seq_len": [64]}, "resources": {"gpu": 1.5}},
            "resources.gpu: above 1 it must be a whole number",
        ),
        ({"grid": {"workload.seq_len": [64]}, "max_concurrent": 0}, "max_concurrent: expected a positive integer"),
        ({"grid": {"workload.seq_len": [64]}, "max_failures": -1}, "max_failures: expected an integer >= 0"),
        ({"grid": {"workload.seq_len": [64]}, "base": [1]}, "base: expected a mapping"),
        ({"grid": {"workload.seq_len": [64]}, "name": "a/b"}, "name: expected a non-empty name"),
    ],
)
def test_bad_spec_names_the_key(raw, needle):
    with pytest.raises(ConfigError) as e:
        parse_spec(dict(raw), path="t.yaml")
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("t.yaml: ")


def test_base_key_errors_surface_at_expansion():
    spec = spec_of(base={"model": {"n_layerz": 2}}, grid={"workload.seq_len": [64]})
    with pytest.raises(ConfigError, match="unknown key 'model.n_layerz'"):
        expand(spec)


def test_invalid_trial_fails_fast_naming_point_and_key(tmp_path, capsys):
    raw = {
        "name": "bad",
        "base": TINY_BASE,
        "grid": {"workload.seq_len": [64, 128], "policy.attention": ["chunked"], "policy.q_chunk": [128]},
    }
    with pytest.raises(ConfigError) as e:
        expand(parse_spec(raw, path="bad.yaml"))
    assert "workload.seq_len=64" in str(e.value) and "policy.q_chunk: 128 is larger than workload.seq_len (64)" in str(
        e.value
    )
    # through the CLI: exit 2, one line, nothing run
    assert main(["sweep", str(write(tmp_path, raw)), "--store", str(tmp_path / "st"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "policy.q_chunk" in err
    # ... and skip_if is the cure
    raw["skip_if"] = ["policy.q_chunk > workload.seq_len"]
    e2 = expand(parse_spec(raw, path="bad.yaml"))
    assert len(e2.trials) == 1 and len(e2.skipped) == 1


def test_missing_spec_file_is_bad_input(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "sweep spec file not found" in capsys.readouterr().err


# --- skip_if ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, needle",
    [
        ("__import__('os').system('true')", "function calls are not allowed"),
        ("open('/etc/passwd') == 1", "function calls are not allowed"),
        ("model.n_layers", "is not a comparison"),
        ("model.n_layers * 2 > 4", "BinOp is not allowed"),
        ("model.n_layers.__class__ == 1", "unknown config key 'model.n_layers.__class__'"),
        ("model.nlayers > 2", "unknown config key 'model.nlayers'"),
        ("[x for x in (1,)] == 1", "ListComp is not allowed"),
        ("model.n_layers is None", "operator Is is not allowed"),
        ("lambda: 1", "Lambda is not a comparison"),
        ("policy.q_chunk >", "is not a valid expression"),
        ("(1).real == 1", "is not allowed"),
        ("", "expected an expression string"),
    ],
)
def test_skip_if_rejects_everything_but_comparisons(expr, needle):
    with pytest.raises(ConfigError) as e:
        SkipRule.parse(expr, "skip_if[0]")
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "expr, flat, expected",
    [
        ("policy.q_chunk > workload.seq_len", {"policy.q_chunk": 128, "workload.seq_len": 64}, True),
        ("policy.q_chunk > workload.seq_len", {"policy.q_chunk": 64, "workload.seq_len": 64}, False),
        (
            "policy.name == 'naive' and workload.seq_len >= 1024",
            {"policy.name": "naive", "workload.seq_len": 2048},
            True,
        ),
        (
            "policy.name in ['naive', 'sdpa'] or not workload.seq_len < 100",
            {"policy.name": "x", "workload.seq_len": 50},
            False,
        ),
        ("policy.name not in ('naive',)", {"policy.name": "sdpa"}, True),
        ("measure.budget_gib != null", {"measure.budget_gib": None}, False),
        ("measure.budget_gib == None", {"measure.budget_gib": None}, True),
        ("measure.budget_gib > 1", {"measure.budget_gib": None}, False),  # null orders with nothing
        ("64 <= workload.seq_len < 128", {"workload.seq_len": 64}, True),
        ("seed == -1", {"seed": -1}, True),
        ("workload.compile == true", {"workload.compile": False}, False),
    ],
)
def test_skip_if_evaluates(expr, flat, expected):
    assert SkipRule.parse(expr, "skip_if[0]")(flat) is expected


def test_skip_if_type_mismatch_is_bad_input():
    rule = SkipRule.parse("policy.name > 3", "skip_if[0]")
    with pytest.raises(ConfigError, match="cannot evaluate"):
        rule({"policy.name": "sdpa"})


# --- expansion -----------------------------------------------------------------------------------------


def test_grid_product_order_skips_and_duplicates():
    spec = spec_of(
        grid={"workload.seq_len": [64, 128], "policy.name": ["sdpa", "checkpoint"], "model.n_layers": [2, 1]},
        skip_if=["model.n_layers == 1 and policy.name == 'checkpoint'"],
    )
    assert spec.grid_size == 8
    e = expand(spec)
    assert [t.point["workload.seq_len"] for t in e.trials] == [64, 64, 64, 128, 128, 128]
    assert len(e.skipped) == 2 and all(rule.startswith("model.n_layers == 1") for _, rule in e.skipped)
    # n_layers written in the grid equal to the base's value is the same config: a duplicate, not a second trial
    spec2 = spec_of(grid={"model.n_layers": [2, 3], "workload.seq_len": [64]}, base={**TINY_BASE})
    assert not expand(spec2).duplicates
    spec3 = spec_of(grid={"policy.name": ["sdpa", "custom"], "workload.seq_len": [64]})
    e3 = expand(spec3)
    # `custom` keeps the default policy keys, which equal sdpa's: same resolved config except the name
    assert len(e3.trials) + len(e3.duplicates) == 2


def test_skip_if_sees_resolved_presets():
    # recompute's preset chunk (512) is clamped to the sequence: no skip at seq_len 64 ...
    spec = spec_of(
        grid={"workload.seq_len": [64], "policy.name": ["recompute"]}, skip_if=["policy.q_chunk > workload.seq_len"]
    )
    assert len(expand(spec).trials) == 1
    # ... but a chunk written in the grid is the user's and is skipped when too large
    spec = spec_of(
        grid={"workload.seq_len": [64], "policy.name": ["recompute"], "policy.q_chunk": [128]},
        skip_if=["policy.q_chunk > workload.seq_len"],
    )
    assert len(expand(spec).skipped) == 1


def test_dry_run_lists_skipped_and_stored(tmp_path):
    from txlab.results.store import Store
    from txlab.sweeps.rows import error_row

    spec = spec_of(grid={"workload.seq_len": [64, 128]}, skip_if=["workload.seq_len > 100"])
    store = tmp_path / "st"
    p = plan(spec, str(store))
    assert len(p.to_run) == 1
    t = p.to_run[0]
    Store.open(str(store), create=True).write_row(error_row(t.key, t.config.flat(), "t", "boom"))
    p = plan(spec, str(store))
    assert p.to_run == [] and "stored (error)" in format_dry_run(p)
    assert len(plan(spec, str(store), rerun_failed=True).to_run) == 1
    text = format_dry_run(p)
    assert "skipped    workload.seq_len=128" in text and "[skip_if: workload.seq_len > 100]" in text


# --- sharded trials (parallel.fsdp) ----------------------------------------------------------------


def test_skip_if_drops_the_fsdp_points_that_would_not_validate(tmp_path):
    """fsdp must divide the global batch and shards training only: skip_if sees parallel.fsdp and drops
    exactly those points; the rest validate and the dry run says what each sharded trial takes."""
    spec = spec_of(
        grid={"parallel.fsdp": [1, 2, 4], "workload.batch_size": [1, 2, 4], "workload.kind": ["train", "prefill"]},
        skip_if=["parallel.fsdp > workload.batch_size", "parallel.fsdp > 1 and workload.kind != 'train'"],
    )
    e = expand(spec)
    assert sorted((t.point["parallel.fsdp"], t.point["workload.batch_size"]) for t in e.trials) == [
        (1, 1), (1, 1), (1, 2), (1, 2), (1, 4), (1, 4), (2, 2), (2, 4), (4, 4)
    ]  # fmt: skip
    assert len(e.skipped) == 9 and all(t.config.parallel.fsdp == t.point["parallel.fsdp"] for t in e.trials)
    text = format_dry_run(plan(spec, str(tmp_path / "st")))
    assert "each trial 1 CPU, 0 GPU (per rank: trials of 2/4 ranks take that many times as much)" in text
    with pytest.raises(ConfigError, match=r"trial \{parallel.fsdp=4, workload.batch_size=1.*must divide"):
        expand(spec_of(grid={"parallel.fsdp": [4], "workload.batch_size": [1]}))


def test_a_rank_takes_one_whole_gpu():
    grid = {"parallel.fsdp": [1, 2], "workload.batch_size": [2]}
    with pytest.raises(ConfigError, match=r"resources.gpu: 0.5 per rank, but trial \{parallel.fsdp=2, .*one GPU"):
        expand(spec_of(grid=grid, resources={"gpu": 0.5}))
    assert len(expand(spec_of(grid=grid, resources={"gpu": 1})).trials) == 2
    assert len(expand(spec_of(grid=grid, resources={"gpu": 0.5}, mode="estimate")).trials) == 2  # nothing runs
    assert len(expand(spec_of(grid={"parallel.fsdp": [1]}, resources={"gpu": 0.5})).trials) == 1


# --- chunk sizes a point's policy does not use -----------------------------------------------------


def test_grid_points_setting_an_unused_chunk_size_are_dropped_and_counted(tmp_path):
    """A loss_chunk axis over policies of which only recompute chunks its loss: the other policies' points
    are dropped before anything runs (each would be sdpa's computation under another trial key), named in
    the dry run with the reason; recompute's points run with the chunk sizes they use."""
    grid = {"policy.name": ["sdpa", "recompute"], "policy.loss_chunk": [32, 64], "workload.seq_len": [64]}
    p = plan(spec_of(grid=grid), str(tmp_path / "st"))
    e = p.expansion
    assert [t.config.policy.name for t in e.trials] == ["recompute", "recompute"]
    assert sorted(t.config.policy.loss_chunk for t in e.trials) == [32, 64]
    assert len(e.unused) == 2 and all(point["policy.name"] == "sdpa" for point, _ in e.unused)
    assert "2 dropped (a chunk size their policy does not use)" in p.summary()
    text = format_dry_run(p)
    assert "dropped    policy.name=sdpa policy.loss_chunk=32" in text
    assert "policy.loss_chunk: 32 is not used: policy.loss is 'full', not chunked" in text


def test_a_base_chunk_size_applies_to_the_points_that_use_it(tmp_path):
    """A chunk size in the base (the KV recompute policy's tile) is applied where the point's policy reads
    it and left out elsewhere (the cache points keep the key they would have without it), said in the dry run."""
    base = {**TINY_BASE, "policy": {"k_chunk": 32}, "workload": {"kind": "decode", "decode_tokens": 2}}
    grid = {"policy.kv": ["cache", "recompute"], "workload.seq_len": [64]}
    p = plan(spec_of(base=base, grid=grid), str(tmp_path / "st"))
    chunks = {t.config.policy.kv: t.config.policy.k_chunk for t in p.expansion.trials}
    assert chunks == {"cache": 64, "recompute": 32}  # cache: the default 512 clamped to the sequence
    without = spec_of(base={**base, "policy": {}}, grid={"policy.kv": ["cache"], "workload.seq_len": [64]})
    assert plan(without, str(tmp_path / "st2")).expansion.trials[0].key == p.expansion.trials[0].key
    assert "base policy.k_chunk not applied to 1 trial(s)" in format_dry_run(p)
