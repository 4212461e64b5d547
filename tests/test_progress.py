"""The driver's Tune callback without Ray running: the progress line counts running trials as Tune starts
them (Tune calls on_trial_start before it marks a trial RUNNING, which made the line show 1 while 2 ran),
and a writer that lost its store lease stops writing."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

from tests.support import TINY_BASE
from txlab.sweeps.plan import plan
from txlab.sweeps.progress import Progress, RowWriter, make_callback_class
from txlab.sweeps.rows import error_row
from txlab.sweeps.spec import parse_spec


def make_writer(tmp_path, cls=None, n=3):
    spec = parse_spec({"name": "t", "base": TINY_BASE, "grid": {"workload.seq_len": [64, 128, 256][:n]}})
    p = plan(spec, str(tmp_path / "st"))
    jobs = {t.key: {"config": t.config.flat()} for t in p.to_run}
    progress = Progress("t", total=len(p.to_run), stream=io.StringIO())
    writer = (cls or make_callback_class())(p, jobs, progress, heartbeat_s=1e9)
    return p, writer, progress


def ok_row(trial) -> dict:
    return {**error_row(trial.key, trial.config.flat(), "t", ""), "status": "ok", "error": None}


def test_running_count_follows_tune_events(tmp_path):
    p, writer, progress = make_writer(tmp_path)
    a, b, c = (
        SimpleNamespace(config={"trial_key": t.key}, status="PENDING", num_failures=1, node_ip="n") for t in p.to_run
    )
    trials = [a, b, c]
    # Tune calls on_trial_start while the trial is still PENDING (status set to RUNNING right after)
    writer.on_trial_start(iteration=1, trials=trials, trial=a)
    a.status = "RUNNING"
    writer.on_trial_start(iteration=1, trials=trials, trial=b)
    b.status = "RUNNING"
    assert progress.running == 2 and "0/3 done, 2 running" in progress.line()
    writer.on_step_end(iteration=2, trials=trials)
    assert progress.running == 2

    # a reports its row (it stays RUNNING in Tune until reaped): 1 running, as the printed line says
    writer.on_trial_result(iteration=3, trials=trials, trial=a, result={"row": json.dumps(ok_row(p.to_run[0]))})
    assert progress.running == 1 and "1/3 done, 1 running" in progress.stream.getvalue().splitlines()[-1]
    writer.on_step_end(iteration=3, trials=trials)
    assert progress.running == 1
    writer.on_trial_complete(iteration=4, trials=trials, trial=a)
    a.status = "TERMINATED"

    # b's node dies: Tune retries it (not running until it starts again), then gives up: an error row
    writer.on_trial_recover(iteration=5, trials=trials, trial=b)
    assert progress.running == 0 and progress.retried == 1
    writer.on_trial_start(iteration=6, trials=trials, trial=b)
    writer.on_trial_start(iteration=6, trials=trials, trial=c)
    assert progress.running == 2
    writer.on_trial_error(iteration=7, trials=trials, trial=b)
    assert progress.running == 1 and progress.counts["error"] == 1
    writer.on_trial_result(iteration=8, trials=trials, trial=c, result={"row": json.dumps(ok_row(p.to_run[2]))})
    assert progress.running == 0 and progress.done == 3
    assert "3/3 done, 0 running | ok 2, OOM 0, over budget 0, failed 1, 1 retried" in progress.stream.getvalue()


def test_a_writer_that_lost_its_lease_stops_the_sweep(tmp_path, monkeypatch):
    p, writer, progress = make_writer(tmp_path, cls=RowWriter, n=2)
    first, second = p.to_run
    writer.trial_reported(first.key, ok_row(first))
    monkeypatch.setattr(p.store, "lock_lost", lambda: "the writer lease was taken over by pid 7 on elsewhere")
    writer.trial_reported(second.key, ok_row(second))
    assert writer.store_error.startswith(f"store {p.store.uri}: the writer lease was taken over by pid 7 on elsewhere")
    assert "1 row(s) written this run are kept" in writer.store_error
    assert set(p.store.statuses()) == {first.key}  # nothing written after the lease was lost
