"""Sweeps end to end on a local Ray instance, resume after SIGKILL, and the trial process boundary.

The Ray tests run `txlab` as a subprocess, as a user would; each starts its own local Ray instance and
the test kills whatever that process group left behind, even on failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.support import REPO, TINY_BASE, kill_session, row_files, trial_processes, txlab_env, write_spec
from txlab.cli import main
from txlab.config import build_config
from txlab.results.store import Store
from txlab.sweeps.driver import error_row, run_in_subprocess


def run_txlab(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "txlab.cli", *args],
        env=txlab_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


# --- the trial process boundary (no Ray) ---------------------------------------------------------------


def test_killed_trial_process_becomes_an_error_row(tmp_path):
    cfg = build_config(TINY_BASE)
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'about to die' >&2\nkill -9 $$\n")
    fake_python.chmod(0o755)
    row = run_in_subprocess(cfg.trial_key, cfg.flat(), "t", python=str(fake_python))
    assert row["status"] == "error" and row["trial_key"] == cfg.trial_key
    assert row["error"].startswith("trial process killed by SIGKILL") and "about to die" in row["error"]
    assert row["workload.seq_len"] == cfg.workload.seq_len and row["duration_s"] is not None
    Store.open(str(tmp_path / "s"), create=True).write_row(row)  # a complete row the store accepts


def test_version_skew_is_caught_in_the_trial_process(tmp_path):
    cfg = build_config(TINY_BASE)
    row = run_in_subprocess("0" * 16, cfg.flat(), "t")
    assert row["status"] == "error" and "trial key mismatch" in row["error"]


def test_error_row_is_complete():
    cfg = build_config(TINY_BASE)
    row = error_row(cfg.trial_key, cfg.flat(), "t", "x" * 5000, host="h", bogus=1)
    assert row["status"] == "error" and len(row["error"]) == 2000 and row["host"] == "h" and "bogus" not in row


def test_row_the_store_refuses_becomes_an_error_row(tmp_path):
    """A row with a column outside the schema (driver and node on different txlab versions) is stored as
    an `error` row saying so; the sweep goes on."""
    import io
    import json
    from types import SimpleNamespace

    from txlab.sweeps.driver import Progress, _make_callback_class, plan
    from txlab.sweeps.spec import parse_spec

    spec = parse_spec({"name": "t", "base": TINY_BASE, "grid": {"workload.seq_len": [64, 128]}})
    p = plan(spec, str(tmp_path / "st"))
    jobs = {t.key: {"config": t.config.flat()} for t in p.to_run}
    progress = Progress("t", total=2, stream=io.StringIO())
    writer = _make_callback_class()(p, jobs, progress, heartbeat_s=1e9)
    good, bad = p.to_run
    for trial, extra in ((good, {}), (bad, {"from_the_future": 1})):
        row = {**error_row(trial.key, trial.config.flat(), "t", ""), "status": "ok", "error": None, **extra}
        fake = SimpleNamespace(config={"trial_key": trial.key}, status="RUNNING")
        writer.on_trial_result(iteration=1, trials=[fake], trial=fake, result={"row": json.dumps(row)})
    stored = Store.open(str(tmp_path / "st")).read().to_pylist()
    by_key = {r["trial_key"]: r for r in stored}
    assert by_key[good.key]["status"] == "ok"
    assert by_key[bad.key]["status"] == "error" and "row refused by the store" in by_key[bad.key]["error"]
    assert progress.counts == {"ok": 1, "oom": 0, "over_budget": 0, "error": 1}
    assert "2/2 done" in progress.stream.getvalue()


def test_dashboard_address_is_refused_with_a_hint(tmp_path, capsys):
    spec = write_spec(tmp_path / "t.yaml", {"workload.seq_len": [64]})
    rc = main(["sweep", str(spec), "--store", str(tmp_path / "st"), "--address", "http://127.0.0.1:8265"])
    assert rc == 2 and "ray job submit" in capsys.readouterr().err
    assert not list((tmp_path / "st").glob("*.parquet"))


# --- Ray: local instance -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_local_sweep_resume_extend_and_rerun(tmp_path, capsys):
    store = tmp_path / "store"
    grid = {"workload.seq_len": [64, 128], "measure.budget_gib": [None, 0.0001]}
    spec = write_spec(tmp_path / "t.yaml", grid, skip_if=["measure.budget_gib != null and workload.seq_len != 128"])

    first = run_txlab(["sweep", str(spec), "--store", str(store)])
    assert first.returncode == 0, first.stdout
    assert "3 trials, 0 already in the store, 3 to run" in first.stdout and "3/3 done" in first.stdout
    rows = Store.open(str(store)).read().to_pylist()
    assert sorted(r["status"] for r in rows) == ["ok", "ok", "over_budget"]
    for r in rows:
        assert r["sweep"] == "t" and r["node_id"] and r["host"] and r["device"] == "cpu"
    files = row_files(store)

    # same spec again: nothing runs (no Ray started), nothing is rewritten
    again = run_txlab(["sweep", str(spec), "--store", str(store)], timeout=60)
    assert again.returncode == 0 and "nothing to run" in again.stdout, again.stdout
    assert row_files(store) == files

    # one more length: only the new trial runs, the old rows stay as they are
    grid["workload.seq_len"].append(256)
    write_spec(spec, grid, skip_if=["measure.budget_gib != null and workload.seq_len != 128"])
    extended = run_txlab(["sweep", str(spec), "--store", str(store)])
    assert extended.returncode == 0, extended.stdout
    assert "4 trials, 3 already in the store, 1 to run" in extended.stdout
    assert set(files) < set(row_files(store)) and len(row_files(store)) == 4

    # rerun one stored trial here, without Ray, and compare
    files = row_files(store)
    key = next(r["trial_key"] for r in rows if r["status"] == "ok")
    assert main(["rerun", "--store", str(store), "--trial", key[:8]]) == 0
    out = capsys.readouterr().out
    assert f"rerunning trial {key}" in out and "stored" in out and "peak_bytes" in out
    assert main(["rerun", "--store", str(store), "--trial", "zzzz"]) == 2
    assert main(["rerun", "--store", str(store), "--trial", key, "--set", "model.nope=1"]) == 2
    assert row_files(store) == files  # rerun writes nothing


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_driver_repeatedly_and_a_trial_process_then_resume_gives_each_row_once(tmp_path):
    """The driver SIGKILLed at random moments, three times over one sweep (while Ray starts, just after a row
    lands, while trials run); then the last run has one of its trial processes SIGKILLed from outside: that
    trial is an `error` row and the sweep goes on. The store ends with exactly the grid's rows, each once,
    every file whole."""
    import random

    from txlab.results.store import check_store

    rng = random.Random(int(os.environ.get("TXLAB_FAULT_SEED", "9")))
    store = tmp_path / "store"
    grid = {"workload.seq_len": [64, 96, 128, 160, 192, 224]}
    total = len(grid["workload.seq_len"])
    spec = write_spec(tmp_path / "t.yaml", grid, max_concurrent=2, precheck=False)
    cmd = [sys.executable, "-m", "txlab.cli", "sweep", str(spec), "--store", str(store)]
    kills = []
    for round_ in range(3):
        before = len(row_files(store))
        if before + 3 > total:
            break  # leave trials for the last run
        driver = subprocess.Popen(
            cmd, env=txlab_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            t0 = time.monotonic()
            if round_ == 0:  # a random moment from the start: Ray starting, the first trials running
                moment = rng.uniform(1.5, 9.0)
                while time.monotonic() - t0 < moment and driver.poll() is None:
                    time.sleep(0.05)
            else:  # a random moment shortly after the next row lands (the writer at work)
                while len(row_files(store)) <= before and time.monotonic() - t0 < 240 and driver.poll() is None:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.3))
            assert driver.poll() is None, "the sweep finished before it could be killed"
            os.kill(driver.pid, signal.SIGKILL)  # the driver only
            driver.wait()
            kills.append(round(time.monotonic() - t0, 2))
        finally:
            kill_session(driver.pid)
        if (store / "_txlab_store.json").exists():  # a kill while Ray starts may come before the store is made
            check = check_store(str(store))
            assert check.ok, check.summary()  # after every kill: every file whole, keys unique
    assert len(kills) >= 2, kills
    kept = row_files(store)
    assert len(kept) <= total - 2

    driver = subprocess.Popen(
        cmd,
        env=txlab_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        victim = None
        deadline = time.monotonic() + 240
        while victim is None and time.monotonic() < deadline and driver.poll() is None:
            procs = trial_processes(driver.pid)
            victim = procs[0] if procs else None
            time.sleep(0.1)
        assert victim is not None, "no trial process to kill"
        victim.kill()  # from outside, as the kernel's OOM killer would
        out, _ = driver.communicate(timeout=300)
    finally:
        kill_session(driver.pid)
    assert driver.returncode == 1, out  # one trial ended in error; the rest ran
    assert f"{len(kept)} already in the store, {total - len(kept)} to run" in out
    assert "1 trial(s) ended in error" in out
    rows = Store.open(str(store)).read().to_pylist()
    keys = [r["trial_key"] for r in rows]
    assert len(rows) == total and len(set(keys)) == total, (len(rows), kills)
    errors = [r for r in rows if r["status"] == "error"]
    assert len(errors) == 1 and errors[0]["error"].startswith("trial process killed by SIGKILL")
    assert sum(r["status"] == "ok" for r in rows) == total - 1
    assert len(row_files(store)) == total and set(kept) <= set(row_files(store))  # finished rows kept, none twice
    check = check_store(str(store))
    assert check.ok and check.rows == total and check.superseded == 0, check.summary()
    assert f"store check: {total} rows (error 1, ok {total - 1})" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dead_trial_actor_is_retried_by_tune(tmp_path):
    """A trial whose Ray worker dies (what a lost node looks like to Tune) is retried (FailureConfig);
    its trial process dies with it (no orphan), and the retry's row is the one stored."""
    import psutil

    store = tmp_path / "store"
    base = {"model": {"n_layers": 2, "d_model": 64}, "workload": {"steps": 40, "warmup_steps": 0, "seq_len": 256}}
    spec = tmp_path / "t.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "t", "base": base, "grid": {"seed": [1]}, "max_failures": 1, "precheck": False})
    )
    driver = subprocess.Popen(
        [sys.executable, "-m", "txlab.cli", "sweep", str(spec), "--store", str(store)],
        env=txlab_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        trial_proc = None
        deadline = time.monotonic() + 180
        while trial_proc is None and time.monotonic() < deadline:
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    if os.getsid(proc.pid) == driver.pid and "txlab.sweeps.worker" in (proc.info["cmdline"] or []):
                        trial_proc = proc
                except (psutil.Error, ProcessLookupError):
                    pass
            time.sleep(0.2)
        assert trial_proc is not None, "no trial process appeared"
        actor = trial_proc.parent()
        actor.kill()  # the Ray worker holding the trial
        trial_proc.wait(timeout=30)  # ... takes its trial process with it
        out, _ = driver.communicate(timeout=240)
    finally:
        kill_session(driver.pid)
    assert driver.returncode == 0, out
    assert "retrying" in out and "1 retried" in out
    rows = Store.open(str(store)).read().to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "ok"
