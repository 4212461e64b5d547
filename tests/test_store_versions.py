"""Stores outlive versions (issue 14): the store written by txlab 0.1 resumes with nothing to run but the
trials of the one preset whose computation changed since (`recompute`, issue 17), plots and checks; rows of several schema versions read as one table; a damaged row file is set aside, not fatal; and
the store directory holds rows only, so any Parquet reader opens it after the README's main job.

tests/fixtures/store_v0_1_smoke is the 16-row store that txlab 0.1 (commit f016620) wrote with
`txlab sweep sweeps/smoke.yaml`. Tests copy it first and never write into it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from tests.support import png_ok
from txlab.cli import main
from txlab.config import build_config
from txlab.results import columns
from txlab.results.columns import SCHEMA_HISTORY, SCHEMA_VERSION, row_schema
from txlab.results.store import MARKER, QUARANTINE, Store, check_store
from txlab.sweeps.plan import plan
from txlab.sweeps.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "store_v0_1_smoke"
SMOKE = REPO / "sweeps" / "smoke.yaml"
FIXTURE_STATUSES = {"ok": 14, "over_budget": 2}
# A short trial of the smoke grid (512 tokens, naive): the one the damage tests break and rerun.
SHORT_TRIAL = "658ff64458918917"
# The smoke grid's four `recompute` rows. The preset computes something else since 0.2 (issue 17: fused
# attention inside the recomputed blocks, where 0.1 ran chunked attention), so these rows match no trial of
# the spec any more (docs/design.md, "Trial keys": a different computation, a different key) and the spec's
# recompute trials run anew under new keys; every other 0.1 row still matches its trial.
RECOMPUTE_0_1 = frozenset({"04e527765434495a", "3675721c7ac4a394", "c9d3dc38bbfed241", "cddf1d6837000b16"})


def smoke_spec_without_recompute(tmp_path: Path) -> Path:
    """The smoke spec less its `recompute` trials: the 12 trials whose 0.1 rows still match."""
    raw = yaml.safe_load(SMOKE.read_text())
    raw["grid"]["policy.name"] = [p for p in raw["grid"]["policy.name"] if p != "recompute"]
    path = tmp_path / "smoke_no_recompute.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_new_recompute_trials(spec_path: Path, store: Path) -> set[str]:
    """Measure the spec's trials not in the store (the recompute ones) in this process and write their rows,
    as the sweep would, but without Ray (seconds for the debug model)."""
    from txlab.trial import run_trial

    spec = load_spec(spec_path)
    p = plan(spec, str(store))
    for t in p.to_run:
        row = run_trial(t.config)
        row["sweep"] = spec.name
        Store.open(str(store)).write_row(row)
    return {t.key for t in p.to_run}


# The row columns of each schema version (sha256 of "name:type" lines). Changing the row schema without
# bumping SCHEMA_VERSION (and adding its SCHEMA_HISTORY note and a line here) fails the test below.
SCHEMA_FINGERPRINTS = {
    1: "3a63c4d7e2f40da8c12c07c78158309b15bfc7600de0e3a9494d5b0a019d235b",
    2: "29443d631af47f1e9757ab7d3254da445d806851e8d784bf6b9ed4df2e2b9c41",
    3: "59b51d251cfc0605036f76cf5ec5056a70e30170b1645b94dcffdc5eea9387f8",
    4: "ae0baad7bdf796f35497b66b9bb846fc7dffcbf17749d7b97d4e3b8852365a60",
    5: "e4d4bad4930cb51dea67ce3537a8f78b765123e6fe2c11eb47a9cd8940114c10",
    6: "c0a0aa4c5cb5bf52d7c87298a7412b6af243603eef5aaf4d727fa03c637b9df7",
    7: "7a2916959766b8eae7153cd8201d7a50b9ee449a4524de755769dbc63c166902",
    8: "48eac9a2170b8b273c9bdb268e2de2046ff550ba91699289e4f49517771d981b",
    9: "eeaed8830de4a3001a1f4ba89326058423e63c10fbc805e1b7728f45ed1d8c99",
    10: "464a53082236b611d6375cf0e795b73772f5dbb06d6c91bee855bdbeb978d833",
    11: "c6c5c3f05887406c0ac611a74a9f1bc6966586f88cbd6b3adf725db2c731b519",
    12: "5630dbc5ce8b8a9fa00e2615469e414b07eca48c0c03ca30888b59b126ce0f9e",
    13: "1a678af3356cbb8fa421dabb13097d2d803747638c6895969ece86fa23efbbf3",
}


def fingerprint(schema: pa.Schema) -> str:
    return hashlib.sha256("\n".join(f"{f.name}:{f.type}" for f in schema).encode()).hexdigest()


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def old_store(tmp_path) -> Path:
    """A private copy of the 0.1 store (the fixture itself stays untouched: checked at the end)."""
    before = tree(FIXTURE)
    copy = tmp_path / "store_v0_1"
    shutil.copytree(FIXTURE, copy)
    yield copy
    assert tree(FIXTURE) == before, "a test wrote into the fixture store"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def file_of(store: Path, key: str) -> Path:
    (found,) = store.glob(f"{key}.*.parquet")
    return found


# --- the 0.1 store under the current code ------------------------------------------------------------


def test_the_0_1_store_plans_only_the_trials_of_the_changed_preset(old_store, capsys, tmp_path):
    p = plan(load_spec(SMOKE), str(old_store))
    assert len(p.expansion.trials) == 16 and len(p.to_run) == 4
    assert {t.config.policy.name for t in p.to_run} == {"recompute"}
    assert not {t.key for t in p.to_run} & RECOMPUTE_0_1  # new keys: 0.1's recompute rows measured chunked attention
    assert p.summary().endswith("16 trials, 12 already in the store, 4 to run")
    assert main(["sweep", str(SMOKE), "--store", str(old_store), "--dry-run"]) == 0
    assert "12 already in the store, 4 to run" in capsys.readouterr().out
    unchanged = smoke_spec_without_recompute(tmp_path)
    assert main(["sweep", str(unchanged), "--store", str(old_store)]) == 0  # no Ray: nothing to run
    assert "12 already in the store, 0 to run" in capsys.readouterr().out


def test_the_0_1_store_checks_sound(old_store):
    check = check_store(str(old_store))
    assert check.ok, check.problems
    assert check.rows == 16 and check.statuses == FIXTURE_STATUSES and not check.quarantined
    assert check.summary().startswith("store check: 16 rows (ok 14, over_budget 2); every file reads")


def test_the_0_1_store_plots_and_reports(old_store, tmp_path, capsys):
    out = tmp_path / "plots" / "smoke"
    assert main(["plot", "--store", str(old_store), "--out", str(out)]) == 0
    assert png_ok(out / "memory_vs_length.png") and png_ok(out / "frontier_heatmap.png")
    for name in ("frontier_heatmap.svg", "frontier.csv", "versus_baseline.csv"):
        assert (out / name).stat().st_size > 0, name
    assert main(["report", "--store", str(old_store), "--out", str(out / "report.md")]) == 0
    assert "16" in (out / "report.md").read_text()
    capsys.readouterr()


def test_a_config_key_added_later_keeps_the_0_1_store_resumable(old_store, monkeypatch, tmp_path):
    """A future release adds `policy.fused_norm` (since 0.2, default off = today's computation): the 0.1
    store still plans 0 to run (the trials whose preset kept its meaning), its rows read the new column as
    the key's default (what they ran with), and a grid that sets the key runs every trial anew."""
    from txlab.config import loading, schema
    from txlab.config.identity import SINCE

    @dataclass
    class FuturePolicy(schema.PolicyConfig):
        fused_norm: bool = field(default=False, metadata={SINCE: "0.2"})

    monkeypatch.setattr(loading, "PolicyConfig", FuturePolicy)
    monkeypatch.setitem(schema.SECTIONS, "policy", FuturePolicy)
    monkeypatch.setattr(schema.TrialConfig.__dataclass_fields__["policy"], "default_factory", FuturePolicy)
    assert "policy.fused_norm" in row_schema().names

    spec = load_spec(smoke_spec_without_recompute(tmp_path))
    assert not plan(spec, str(old_store)).to_run
    column = Store.open(str(old_store)).read().column("policy.fused_norm")
    assert column.null_count == 0 and not any(column.to_pylist())

    spec.grid["policy.fused_norm"] = [False, True]
    p = plan(spec, str(old_store))
    assert len(p.expansion.trials) == 24 and len(p.to_run) == 12
    assert {t.config.policy.fused_norm for t in p.to_run} == {True}


# --- rows of several schema versions -------------------------------------------------------------------


def test_rows_of_older_and_newer_schemas_read_as_one_table(old_store):
    store = Store.open(str(old_store))
    cfg = build_config({"model": {"n_layers": 2, "d_model": 64}, "workload": {"seq_len": 64}})
    new = {**dict.fromkeys(row_schema().names), **cfg.flat(), "trial_key": cfg.trial_key, "status": "ok"}
    store.write_row({**new, "peak_bytes": 123, "kv_cache_bytes": 7, "txlab_version": "0.2.0"})
    # a row of an older schema: no inference or quantization columns at all
    older = build_config({"model": {"n_layers": 2, "d_model": 64}, "workload": {"seq_len": 128}})
    gone = {"kv_cache_bytes", "kv_inputs_bytes", "weight_bytes", "weight_bytes_fp", "model.quant", "policy.kv"}
    schema = pa.schema([f for f in row_schema() if f.name not in gone])
    old_row = {k: v for k, v in {**new, **older.flat(), "trial_key": older.trial_key}.items() if k in schema.names}
    pq.write_table(pa.Table.from_pylist([old_row], schema=schema), old_store / f"{older.trial_key}.1.parquet")

    table = store.read()
    assert table.num_rows == 18 and table.schema.equals(row_schema(), check_metadata=False)
    by_key = {r["trial_key"]: r for r in table.to_pylist()}
    assert by_key[cfg.trial_key]["kv_cache_bytes"] == 7
    assert all(by_key[older.trial_key][c] is None for c in gone)
    assert (
        by_key["c9d3dc38bbfed241"]["txlab_version"] == "0.1.0" and by_key["c9d3dc38bbfed241"]["kv_cache_bytes"] is None
    )
    assert check_store(str(old_store)).ok


def test_schema_versions_are_pinned_and_noted():
    """Version 1 is the 0.1 fixture's schema; each version's columns are pinned; each has a note."""
    assert sorted(SCHEMA_HISTORY) == list(range(1, SCHEMA_VERSION + 1))
    fixture_schema = pq.read_schema(next(FIXTURE.glob("*.parquet")))
    assert fixture_schema.metadata[b"txlab.schema_version"] == b"1"
    assert fingerprint(fixture_schema) == SCHEMA_FINGERPRINTS[1]  # version 1 is what 0.1 wrote
    now = fingerprint(row_schema())
    assert now == SCHEMA_FINGERPRINTS.get(SCHEMA_VERSION), (
        f"the row schema changed: bump SCHEMA_VERSION (txlab/results/columns.py), add its SCHEMA_HISTORY note "
        f"and pin it here: SCHEMA_FINGERPRINTS[{SCHEMA_VERSION + 1}] = {now!r}"
    )


def test_a_newer_writer_raises_the_markers_version(old_store, monkeypatch):
    """A store that holds rows of a newer schema says so in its marker, so an older txlab refuses it
    instead of misreading it (a store newer than the reader is bad input)."""
    from txlab.results import store as store_module

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setattr(columns, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    s = Store.open(str(old_store))
    assert s.marker_version == 1
    cfg = build_config({"model": {"n_layers": 2, "d_model": 64}})
    s.write_row({**dict.fromkeys(row_schema().names), **cfg.flat(), "trial_key": cfg.trial_key, "status": "ok"})
    assert f'"schema_version": {SCHEMA_VERSION + 1}' in (old_store / MARKER).read_text()
    monkeypatch.undo()
    with pytest.raises(Exception, match="newer than this txlab reads"):
        Store.open(str(old_store))


# --- a damaged row file is set aside, not fatal --------------------------------------------------------


def test_a_truncated_file_is_skipped_reported_and_its_trial_reruns(old_store, capsys):
    bad = file_of(old_store, SHORT_TRIAL)
    truncate(bad)
    (old_store / "ffffffffffffffff.1.parquet").write_bytes(b"")  # an empty file: damaged too
    store = Store.open(str(old_store))
    table = store.read()
    assert table.num_rows == 15 and SHORT_TRIAL not in table.column("trial_key").to_pylist()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("warning: ") for line in err)
    (line,) = [e for e in err if bad.name in e]
    assert "is unreadable" in line and "the rest of the store reads" in line and "reruns its trial" in line
    assert len(store) == 15 and store.read().num_rows == 15  # read again: no second warning
    assert capsys.readouterr().err == ""

    check = check_store(str(old_store))
    assert (
        not check.ok
        and check.rows == 15
        and sorted(check.unreadable) == sorted([bad.name, "ffffffffffffffff.1.parquet"])
    )
    assert f"{bad.name}: unreadable" in check.summary()

    p = plan(load_spec(SMOKE), str(old_store))
    reruns = {t.key for t in p.to_run if t.config.policy.name != "recompute"}  # (the 4 recompute trials run anew)
    assert reruns == {SHORT_TRIAL} and p.summary().endswith("11 already in the store, 5 to run")

    # a writer (a sweep) moves them aside: every Parquet reader opens the store again
    with p.store.writer_lock():
        pass
    assert not bad.exists() and (old_store / QUARANTINE / bad.name).exists()
    assert (old_store / QUARANTINE / bad.name).read_bytes()  # kept for inspection, nothing deleted
    import pandas as pd

    assert len(pd.read_parquet(old_store)) == 15 and pads.dataset(str(old_store)).count_rows() == 15
    after = check_store(str(old_store))
    assert after.ok and after.quarantined == 2 and "2 unreadable file(s) set aside in _quarantine/" in after.summary()
    assert {t.key for t in plan(load_spec(SMOKE), str(old_store)).to_run if t.config.policy.name != "recompute"} == {
        SHORT_TRIAL
    }


def test_damage_found_while_writing_is_moved_at_once(old_store, capsys):
    bad = file_of(old_store, SHORT_TRIAL)
    bad.write_bytes(b"PAR1 this is not parquet PAR1")
    store = Store.open(str(old_store))
    with store.writer_lock():
        assert len(store.statuses()) == 15
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"{bad.name} is unreadable" in err and "moved to _quarantine/" in err
    assert (old_store / QUARANTINE / bad.name).exists()


def test_the_newest_file_damaged_an_older_one_of_its_key_takes_over(old_store, capsys):
    """A writer killed between writing a key's new file and deleting the old one, the new one damaged: the
    older row reads (nothing else is lost)."""
    good = file_of(old_store, SHORT_TRIAL)
    t = int(good.name.split(".")[1])
    newer = old_store / f"{SHORT_TRIAL}.{t + 1}.parquet"
    newer.write_bytes(good.read_bytes()[:100])
    statuses = Store.open(str(old_store)).statuses()
    assert len(statuses) == 16 and statuses[SHORT_TRIAL] == "ok"
    assert newer.name in capsys.readouterr().err


def test_a_row_of_a_newer_schema_is_refused_not_set_aside(old_store):
    """A file that does not read into today's schema because a newer txlab wrote it (a retyped column, its
    footer's schema version above ours) refuses the store: upgrade txlab. It is not damage to set aside."""
    from txlab.results.store import StoreError

    path = file_of(old_store, SHORT_TRIAL)
    table = pq.read_table(path)
    i = table.schema.get_field_index("peak_bytes")
    table = table.set_column(i, "peak_bytes", pa.array(["0.09 GiB"]))
    table = table.replace_schema_metadata({"txlab.schema_version": str(SCHEMA_VERSION + 1)})
    pq.write_table(table, path)
    store = Store.open(str(old_store))
    with pytest.raises(StoreError, match=f"has schema version {SCHEMA_VERSION + 1}, newer than this txlab reads"):
        with store.writer_lock():
            store.read()
    assert path.exists() and not (old_store / QUARANTINE).exists()


def test_a_problem_that_is_not_one_file_still_fails_as_before(old_store, monkeypatch):
    """Only damage a single file explains is skipped; anything else (a store that reads nowhere) is an error."""
    from txlab.results.store import StoreError

    store = Store.open(str(old_store))

    def broken(paths):
        raise OSError("connection reset")

    monkeypatch.setattr(store, "_dataset", broken)
    with pytest.raises(StoreError, match="unreadable row files"):
        store.read()


# --- the store holds rows only: the README's main job, then any Parquet reader -------------------------


def readme_main_job() -> list[list[str]]:
    """The `txlab` commands of README.md's "Main job" section, in order, each split as a shell would."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Main job", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.strip().splitlines():
            for command in line.split("&&"):
                argv = shlex.split(command, comments=True)
                if argv:
                    commands.append(argv)
    return commands


def test_readme_main_job_leaves_a_store_every_reader_opens(tmp_path, monkeypatch, capsys):
    """Run the README's main-job commands exactly as written (in a scratch directory whose results/smoke
    already holds a row of each of the smoke sweep's 16 trials: the 0.1 fixture's and the 4 recompute trials
    measured here, so the sweep resumes with nothing to run instead of spending minutes on Ray); then pandas
    and pyarrow read one row per trial from the store (the 0.1 recompute rows beside them)."""
    commands = readme_main_job()
    assert [c[:2] for c in commands] == [["txlab", "sweep"], ["txlab", "plot"], ["txlab", "report"]], commands
    stores = {c[c.index("--store") + 1] for c in commands}
    assert len(stores) == 1
    (store,) = stores
    shutil.copytree(REPO / "sweeps", tmp_path / "sweeps")
    shutil.copytree(FIXTURE, tmp_path / store)
    monkeypatch.chdir(tmp_path)
    spec_path = Path([c for c in commands if c[1] == "sweep"][0][2])
    assert len(run_new_recompute_trials(spec_path, tmp_path / store)) == 4
    for argv in commands:
        assert main(argv[1:]) == 0, argv
    out = capsys.readouterr().out
    assert "nothing to run" in out and "wrote " in out

    import pandas as pd

    df = pd.read_parquet(store)
    assert len(df) == 20 and df["trial_key"].is_unique
    assert pads.dataset(store, format="parquet").count_rows() == 20
    assert pq.read_table(store).num_rows == 20
    written = [p for p in (tmp_path / store).rglob("*") if p.is_file() and not p.name.startswith("_")]
    assert all(p.suffix == ".parquet" and p.parent == tmp_path / store for p in written), written
    # the sweep's closing hint gives the README's own plot and report commands
    from txlab.sweeps.cli import next_steps

    hint = next_steps(store, "smoke")
    assert shlex.join(commands[1]) in hint and shlex.join(commands[2]) in hint, hint


def test_plots_and_reports_inside_a_store_are_refused(old_store, tmp_path, capsys):
    for argv in (
        ["plot", "--store", str(old_store), "--out", str(old_store / "plots")],
        ["report", "--store", str(old_store), "--out", str(old_store / "report.html")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out ") and "inside the txlab store" in err and "plots/store_v0_1" in err
    assert not (old_store / "plots").exists() and not (old_store / "report.html").exists()
    # under a `_` folder of the store, which Parquet readers skip, is allowed
    assert main(["plot", "--store", str(old_store), "--out", str(old_store / "_plots")]) == 0
    assert pads.dataset(str(old_store), format="parquet").count_rows() == 16
    capsys.readouterr()


# --- end to end: a sweep resumes a damaged 0.1 store, rerunning that trial only -------------------------


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sweep_resumes_a_damaged_0_1_store_rerunning_that_trial_only(old_store):
    truncate(file_of(old_store, SHORT_TRIAL))
    others = {p.name: p.read_bytes() for p in old_store.glob("*.parquet") if not p.name.startswith(SHORT_TRIAL)}
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "txlab", "sweep", str(SMOKE), "--store", str(old_store)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=360)
    finally:
        _kill_session(proc.pid)
    assert proc.returncode == 0, out
    # the damaged trial and the 4 recompute trials of the changed preset (RECOMPUTE_0_1) run
    assert "11 already in the store, 5 to run" in out and "[smoke] 5/5 done" in out
    assert out.count("warning:") == 1 and "is unreadable" in out
    assert "1 unreadable file(s) set aside in _quarantine/" in out and "store check: 20 rows" in out
    assert {p.name: p.read_bytes() for p in old_store.glob("*.parquet") if p.name in others} == others
    statuses = Store.open(str(old_store)).statuses()
    assert len(statuses) == 20 and statuses[SHORT_TRIAL] == "ok"
    import pandas as pd

    assert len(pd.read_parquet(old_store)) == 20


def _kill_session(leader_pid: int) -> None:
    import psutil

    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and os.getsid(proc.pid) == leader_pid:
                proc.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


def test_rows_older_than_a_key_read_its_default():
    """A version-1 row holds null in a column added later; the store reads it as the key's default (what
    the row ran with), so old and new rows of one computation group together."""
    from txlab.results.columns import added_defaults
    from txlab.results.store import read_store

    df = read_store(str(FIXTURE))
    defaults = added_defaults()
    assert defaults["model.attn_bias"] is True and defaults["model.rope_theta"] == 10000.0
    for column, value in defaults.items():
        assert (df[column] == value).all(), column
    assert df["model.hf"].isna().all()  # a null default stays null
