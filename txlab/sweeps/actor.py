"""One trial of a sweep, inside its Ray actor: the Tune function trainable and the three ways it gets the
trial's row. A measured one-device trial runs in a fresh process (`run_in_subprocess`, txlab.sweeps.worker);
a measured trial of fsdp x cp x tp = N ranks runs them in the trial's placement group (`sharded_on_ray`,
txlab.sweeps.ranks); an estimate runs in the (reused) actor itself (`estimate_in_actor`). Each always
returns a row: a trial process that dies becomes an `error` row here. Only failures Ray sees (a lost node,
a killed actor, a lost rank) raise, so that Tune's FailureConfig retries the trial.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

from txlab.sweeps.placement import layout_of, trial_ranks
from txlab.sweeps.rows import error_row, utc_now


def run_in_subprocess(
    trial_key: str,
    flat: dict[str, Any],
    sweep: str,
    python: str | None = None,
    mode: str = "measure",
    precheck: bool = True,
) -> dict[str, Any]:
    """Run one trial in a fresh Python process; always returns a row (an `error` row if it died).
    `mode` and `precheck`: the spec's (see sweeps.spec)."""
    import socket

    from txlab.sweeps.worker import run_worker

    started, t0 = utc_now(), time.perf_counter()
    done = run_worker({"trial_key": trial_key, "config": flat, "mode": mode, "precheck": precheck}, python)
    if done.returncode == 0 and done.row is not None:
        return done.row
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        why = f"trial process killed by {name}"
        if name == "SIGKILL":
            why += " (out of host memory? the kernel's OOM killer sends SIGKILL)"
    else:
        why = f"trial process exited with status {done.returncode}"
    last = done.last_line()
    message = why + (f": {last}" if last else "")
    return error_row(
        trial_key,
        flat,
        sweep,
        message,
        host=socket.gethostname(),
        started_at=started,
        duration_s=time.perf_counter() - t0,
    )


def estimate_in_actor(trial_key: str, flat: dict[str, Any], sweep: str) -> dict[str, Any]:
    """An estimate-mode trial in this process (the actor, reused across trials): always returns a row."""
    import socket

    from txlab.sweeps.worker import row_for

    started, t0 = utc_now(), time.perf_counter()
    try:
        return row_for({"trial_key": trial_key, "config": flat, "mode": "estimate"})
    except Exception as e:  # noqa: BLE001 - estimate_trial makes its own error rows; this is a key mismatch
        return error_row(
            trial_key,
            flat,
            sweep,
            f"{e.__class__.__name__}: {e}",
            host=socket.gethostname(),
            started_at=started,
            duration_s=time.perf_counter() - t0,
            measured=False,
        )


def sharded_on_ray(
    trial_key: str, flat: dict[str, Any], sweep: str, precheck: bool, cpu: float, gpu: float
) -> dict[str, Any]:
    """A trial of N ranks (fsdp x cp x tp): its N ranks in the trial's placement group (txlab.sweeps.ranks), one
    row. A rank whose Ray actor died raises (RankLost) so that Tune retries the trial."""
    import socket

    from txlab.sweeps.ranks import run_ranks
    from txlab.sweeps.worker import trial_config

    started, t0 = utc_now(), time.perf_counter()
    try:
        cfg = trial_config(trial_key, flat)  # raises on a trial key mismatch (another txlab on this node)
    except Exception as e:  # noqa: BLE001 - a config this node cannot build is the trial's error row
        message = f"{e.__class__.__name__}: {e}"
        return error_row(trial_key, flat, sweep, message, host=socket.gethostname(), started_at=started)
    job = {"trial_key": trial_key, "config": flat, "mode": "measure", "precheck": precheck}
    return run_ranks(cfg, job, cpu, gpu, started, t0)


def trainable(
    config: dict[str, Any],
    jobs: dict[str, dict[str, Any]] | None = None,
    sweep: str = "",
    mode: str = "measure",
    precheck: bool = True,
    cpu: float = 1.0,
    gpu: float = 0.0,
) -> None:
    """The Tune function trainable: one trial, one row, one `tune.report`."""
    import ray
    from ray import tune

    key = config["trial_key"]
    if mode == "estimate":
        row = estimate_in_actor(key, jobs[key], sweep)
    elif trial_ranks(layout_of(jobs[key]), mode) > 1:
        row = sharded_on_ray(key, jobs[key], sweep, precheck, cpu, gpu)
    else:
        row = run_in_subprocess(key, jobs[key], sweep, mode=mode, precheck=precheck)
    row["sweep"] = sweep
    row["node_id"] = row.get("node_id") or ray.get_runtime_context().get_node_id()
    tune.report({"row": json.dumps(row, default=str), "status": row["status"]})
