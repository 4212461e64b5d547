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
from txlab.sweeps.actor import run_in_subprocess
from txlab.sweeps.rows import error_row


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

    from txlab.sweeps.plan import plan
    from txlab.sweeps.progress import Progress, make_callback_class
    from txlab.sweeps.spec import parse_spec

    spec = parse_spec({"name": "t", "base": TINY_BASE, "grid": {"workload.seq_len": [64, 128]}})
    p = plan(spec, str(tmp_path / "st"))
    jobs = {t.key: {"config": t.config.flat()} for t in p.to_run}
    progress = Progress("t", total=2, stream=io.StringIO())
    writer = make_callback_class()(p, jobs, progress, heartbeat_s=1e9)
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


# --- sharded trials: what they ask of Ray, where they can go, a rank's precheck (no Ray started) ----------

SHARDED = {**TINY_BASE, "workload": {**TINY_BASE["workload"], "batch_size": 4}, "measure": {"device": "cpu"}}


def test_a_sharded_trial_asks_tune_for_one_bundle_per_rank(tmp_path):
    from txlab.sweeps.placement import trial_resources
    from txlab.sweeps.plan import plan
    from txlab.sweeps.spec import parse_spec

    raw = {"name": "t", "base": SHARDED, "grid": {"parallel.fsdp": [1, 4]}, "resources": {"cpu": 1.5, "gpu": 1}}
    p = plan(parse_spec(raw), str(tmp_path / "st"))
    resources = trial_resources(p.spec, p.to_run)
    one, four = (resources({"trial_key": t.key}) for t in p.to_run)
    assert one.bundles == [{"CPU": 1.5, "GPU": 1.0}] and not one.head_bundle_is_empty
    # the trainable in an empty head bundle, one bundle per rank, packed onto as few nodes as hold them
    assert four.head_bundle_is_empty and four.bundles == [{"CPU": 1.5, "GPU": 1.0}] * 4 and four.strategy == "PACK"
    assert four.required_resources == {"CPU": 6.0, "GPU": 4.0}
    p = plan(parse_spec({**raw, "mode": "estimate"}), str(tmp_path / "st"))  # rank 0 on a fake process group
    assert [trial_resources(p.spec, p.to_run)({"trial_key": t.key}).bundles for t in p.to_run] == [
        [{"CPU": 1.5, "GPU": 1.0}]
    ] * 2


def test_a_tp_trial_asks_for_one_bundle_per_tp_group_and_its_ranks_fill_them_in_mesh_order(tmp_path):
    from txlab.sweeps.placement import layout_of, trial_resources
    from txlab.sweeps.plan import plan
    from txlab.sweeps.spec import parse_spec

    grid = {"parallel.fsdp": [2], "parallel.tp": [1, 2]}
    raw = {"name": "t", "base": SHARDED, "grid": grid, "resources": {"cpu": 1.5, "gpu": 1}}
    p = plan(parse_spec(raw), str(tmp_path / "st"))
    resources = trial_resources(p.spec, p.to_run)
    by_tp = {t.config.parallel.tp: resources({"trial_key": t.key}) for t in p.to_run}
    assert by_tp[1].bundles == [{"CPU": 1.5, "GPU": 1.0}] * 2  # no TP: a bundle per rank, as before
    # fsdp 2 x tp 2: a bundle per TP group holding both ranks' shares (a bundle is on one node), packed
    assert by_tp[2].head_bundle_is_empty and by_tp[2].bundles == [{"CPU": 3.0, "GPU": 2.0}] * 2
    assert by_tp[2].strategy == "PACK" and by_tp[2].required_resources == {"CPU": 6.0, "GPU": 4.0}
    # the trainable reads the layout from the trial's flat config: 4 ranks, rank r in bundle r // tp
    (four,) = [t for t in p.to_run if t.config.parallel.tp == 2]
    layout = layout_of(four.config.flat())
    assert (layout.world, layout.tp) == (4, 2)
    p = plan(parse_spec({**raw, "mode": "estimate"}), str(tmp_path / "st2"))  # rank 0 on a fake process group
    assert {len(trial_resources(p.spec, p.to_run)({"trial_key": t.key}).bundles) for t in p.to_run} == {1}


def test_a_tp_group_that_no_node_holds_is_refused_in_one_line(capsys):
    from txlab.config import ConfigError
    from txlab.sweeps.placement import check_fits
    from txlab.sweeps.spec import expand, parse_spec

    raw = {"name": "t", "base": SHARDED, "grid": {"parallel.fsdp": [2], "parallel.tp": [2]}, "resources": {"cpu": 1}}
    spec = parse_spec(raw)
    ts = expand(spec).trials
    check_fits(spec, ts, [{"CPU": 2.0}] * 2, False, "c")  # a TP group a node
    with pytest.raises(ConfigError) as e:  # 4 CPUs in all, but no node holds a TP group's 2
        check_fits(spec, ts, [{"CPU": 1.0}] * 4, False, "the cluster (local)")
    assert str(e.value) == (
        "sweep t: trials with parallel.fsdp 2 x parallel.tp 2 need 2 x {2 CPU, 0 GPU} on one node each (a TP "
        "group's 2 ranks share a node; resources per rank {1 CPU, 0 GPU}); the cluster (local) has 4 x {1 CPU, "
        "0 GPU}: they can never be placed (lower resources or parallel.tp, or run on a larger cluster)"
    )
    check_fits(spec, ts, [{"CPU": 1.0}] * 4, True, "c")  # an autoscaler may add such nodes
    assert "warning: trials with parallel.fsdp 2 x parallel.tp 2 need" in capsys.readouterr().err
    spec = parse_spec({**raw, "resources": {"cpu": 0.5}})  # half a CPU a rank: a 1-CPU node holds a group
    check_fits(spec, expand(spec).trials, [{"CPU": 1.0}] * 2, False, "c")


def test_trials_that_can_never_be_placed_are_refused_on_a_fixed_cluster(capsys):
    from txlab.config import ConfigError
    from txlab.sweeps.cluster import scales_by_report
    from txlab.sweeps.placement import check_fits
    from txlab.sweeps.spec import expand, parse_spec

    def trials(**raw):
        spec = parse_spec({"name": "t", "base": SHARDED, "grid": {"parallel.fsdp": [1, 2]}, **raw})
        return spec, expand(spec).trials

    spec, ts = trials(resources={"cpu": 1})
    check_fits(spec, ts, [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 0.0}], False, "the cluster")  # a rank on each node
    with pytest.raises(ConfigError) as e:
        check_fits(spec, ts, [{"CPU": 1.0}], False, "the cluster (local)")
    assert str(e.value) == (
        "sweep t: trials with parallel.fsdp 2 need 2 x {1 CPU, 0 GPU} (resources per rank; 2 CPU and 0 GPU in all); "
        "the cluster (local) has 1 x {1 CPU, 0 GPU}: they can never be placed (lower resources or parallel.fsdp, "
        "or run on a larger cluster)"
    )
    for scales in (True, None):  # an autoscaler may add nodes (or Ray does not say): a warning, no refusal
        check_fits(spec, ts, [{"CPU": 1.0}], scales, "the cluster")
        assert "warning: trials with parallel.fsdp 2 need 2 x {1 CPU, 0 GPU}" in capsys.readouterr().err
    spec, ts = trials(resources={"cpu": 2, "gpu": 1})  # per node: min over CPU and GPU
    check_fits(spec, ts, [{"CPU": 8.0, "GPU": 1.0}] * 2, False, "c")
    with pytest.raises(ConfigError, match=r"has 2 x \{1 CPU, 2 GPU\}"):
        check_fits(spec, ts, [{"CPU": 1.0, "GPU": 2.0}] * 2, False, "c")
    spec, ts = trials(resources={"cpu": 4}, grid={"parallel.fsdp": [1]})
    with pytest.raises(ConfigError, match=r"each trial needs \{4 CPU, 0 GPU\}; c has 2 x \{2 CPU, 0 GPU\}"):
        check_fits(spec, ts, [{"CPU": 2.0}] * 2, False, "c")
    spec, ts = trials(resources={"cpu": 1}, mode="estimate")  # an estimate is one process, whatever N
    check_fits(spec, ts, [{"CPU": 1.0}], False, "c")
    # the v1 monitor's report: a read-only provider (nodes started by hand) names each type after its node
    report = '{"autoscaler_report": {"node_type_mapping": {"2ddb": "node_2ddb", "77af": "node_77af"}}}'
    assert scales_by_report(report) is False
    assert scales_by_report('{"autoscaler_report": {"node_type_mapping": {"10.0.0.5": "gpu_80gb"}}}') is True
    assert scales_by_report(None) is None and scales_by_report("{}") is None


def test_a_ranks_precheck_is_one_ranks_estimate_against_its_memory(monkeypatch):
    from txlab.sweeps.worker import rank_row
    from txlab.trial import estimate_trial, precheck

    def config(**over):
        return build_config({**SHARDED, **{k: {**SHARDED.get(k, {}), **v} for k, v in over.items()}})

    one, two = config(), config(parallel={"fsdp": 2})
    p1, p2 = estimate_trial(one, "cpu")["peak_bytes"], estimate_trial(two, "cpu")["peak_bytes"]
    assert p2 < p1
    between = (p1 + p2) / 2 / 2**30  # GiB: over one device's peak, above one rank's of two
    assert precheck(config(measure={"budget_gib": between}))["status"] == "over_budget"
    assert precheck(config(measure={"budget_gib": between}, parallel={"fsdp": 2}), ranks_here=1) is None
    # CPU ranks on one machine share its RAM: each compares with its share of what is free
    monkeypatch.setattr("txlab.trial.run.free_bytes", lambda kind, device="auto": int(p2 * 1.5))
    assert precheck(two, ranks_here=1) is None
    row = precheck(two, ranks_here=2)
    assert row["status"] == "over_budget" and row["measured"] is False and row["peak_bytes"] == p2
    assert "over its share of the RAM free now (1/2: 2 ranks on this machine)" in row["error"], row["error"]
    assert row["error"].endswith("(not run)")
    # a rank predicted over its budget returns at once: it never joins its process group (no master here)
    tiny = config(measure={"budget_gib": 1e-6}, parallel={"fsdp": 2})
    job = {"precheck": True, "rank": 1, "world": 2, "master": ["192.0.2.1", 9], "ranks_here": 1}
    row = rank_row(tiny, job)
    assert row["status"] == "over_budget" and row["error"].endswith("(not run)")


def test_the_rows_of_ranks_on_two_nodes_merge_into_one():
    from txlab.sweeps.ranks import _merge, rank_jobs

    cfg = build_config({**SHARDED, "parallel": {"fsdp": 2}})
    places = [{"node_id": "aa", "ip": "10.0.0.1", "host": "h1", "port": 29500},
              {"node_id": "bb", "ip": "10.0.0.2", "host": "h2", "port": 1}]  # fmt: skip
    jobs = rank_jobs({"trial_key": cfg.trial_key}, places, gpu=0, cpu=1)
    assert [(j["rank"], j["world"], j["master"], j["local_rank"], j["ranks_here"]) for j in jobs] == [
        (0, 2, ["10.0.0.1", 29500], 0, 1), (1, 2, ["10.0.0.1", 29500], 0, 1)
    ]  # fmt: skip
    assert [j["local_rank"] for j in rank_jobs({}, [places[0], places[0]], gpu=0, cpu=1)] == [0, 1]
    assert [j["local_rank"] for j in rank_jobs({}, [places[0], places[0]], gpu=1, cpu=1)] == [0, 0]  # own GPU each
    ok = {"status": "ok", "error": None, "peak_bytes": 10, "step_time_s": 1.0, "loss": 2.0, "device": "cpu",
          "device_capacity_bytes": 99, "measured": True}  # fmt: skip
    row = _merge(cfg, [ok, {**ok, "peak_bytes": 12}], places, "t0", time.perf_counter())
    assert row["status"] == "ok" and row["peak_bytes"] == 12 and row["node_id"] == "aa,bb" and row["host"] == "h1,h2"
    assert row["measured"] is True and row["device"] == "cpu" and row["started_at"] == "t0"
    over = {**ok, "status": "over_budget", "error": "predicted peak 1 GiB over the budget (not run)", "measured": False}
    row = _merge(cfg, ["stopped after rank 1 ended", over], places, "t0", time.perf_counter())
    assert row["status"] == "over_budget" and row["measured"] is False and row["error"].startswith("rank 1: predicted")
    row = _merge(cfg, [ok, "killed by signal 9 (SIGKILL) on h2"], places, "t0", time.perf_counter())
    assert row["status"] == "error" and row["error"] == "rank 1 of 2 died (killed by signal 9 (SIGKILL) on h2)"


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


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_sharded_trials_on_ray_and_a_killed_rank(tmp_path):
    """Two parallel.fsdp = 2 trials on local Ray, each rank in a bundle of its own (both CPUs: one trial at a
    time). Rank 1 of the long one is SIGKILLed from outside: that trial is an `error` row naming rank 1, its
    rank 0 is stopped (not left in a collective for the 10-minute timeout); the other trial is one `ok` row."""
    import json

    import psutil

    store = tmp_path / "store"
    base = {"model": {"n_layers": 2, "d_model": 64}, "measure": {"device": "cpu"},
            "workload": {"warmup_steps": 0, "seq_len": 128, "batch_size": 2}, "parallel": {"fsdp": 2}}  # fmt: skip
    spec = write_spec(tmp_path / "t.yaml", {"workload.steps": [2, 400]}, base=base, precheck=False)
    driver = subprocess.Popen(
        [sys.executable, "-m", "txlab.cli", "sweep", str(spec), "--store", str(store)],
        env=txlab_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

    def rank1_of_the_long_trial():
        for proc in trial_processes(driver.pid):
            try:
                job = proc.cmdline()[-2]
                if "txlab-rank1-" in job and json.load(open(job))["config"]["workload.steps"] == 400:
                    return proc
            except (psutil.Error, OSError, ValueError, IndexError):
                pass
        return None

    try:
        victim, deadline = None, time.monotonic() + 300
        while victim is None and time.monotonic() < deadline and driver.poll() is None:
            victim = rank1_of_the_long_trial()
            time.sleep(0.2)
        assert victim is not None, "rank 1 of the long trial never ran"
        time.sleep(10)  # into its steps: rank 0 waits on it in collectives
        victim.kill()
        out, _ = driver.communicate(timeout=300)
        left = trial_processes(driver.pid)
    finally:
        kill_session(driver.pid)
    assert driver.returncode == 1, out  # one trial ended in error
    assert "2/2 done" in out and "1 trial(s) ended in error" in out, out
    assert not left, "a rank outlived its trial"
    rows = {r["workload.steps"]: r for r in Store.open(str(store)).read().to_pylist()}
    killed, ok = rows[400], rows[2]
    assert killed["status"] == "error" and killed["error"].startswith(
        "rank 1 of 2 died (killed by signal 9 (SIGKILL) on "
    )
    assert killed["duration_s"] < 200 and killed["parallel.fsdp"] == 2
    assert ok["status"] == "ok" and ok["measured"] and ok["peak_bytes"] > 0 and ok["peak_spread_bytes"] >= 0, ok
    assert ok["node_id"] and "," not in ok["node_id"] and ok["tokens_per_s"] > 0  # both ranks on this one node
