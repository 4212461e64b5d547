"""One trial in a fresh process: `python -m txlab.sweeps.worker CONFIG.json ROW.json`.

The Ray Tune trial (an actor) starts this process and waits for it, so that a trial's allocator state,
leaks, CUDA context and any crash (a segfault, the kernel's OOM killer) stay in a process of its own:
the actor survives to report an `error` row, and only the failures Ray itself sees (a lost node, a
killed actor) reach Tune's retry logic (FailureConfig).

CONFIG.json holds the trial's flat config, the spec's mode and precheck; ROW.json receives the row written
by `txlab.measure.trial.run_trial`, or by `txlab.measure.estimate.estimate_trial` when the precheck predicts the trial
over its budget or over the memory free (then it is not run). Estimate-mode sweeps call `row_for` in
the (reused) actor instead: fake tensors allocate nothing, so a process per estimate buys no isolation,
only a torch import per trial.
Exit status 0 when the row was written (whatever its status), 1 otherwise (traceback on stderr).
"""

from __future__ import annotations

import json
import os
import sys


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the trial's actor dies (Tune stopped it, its node went away), so no trial
    process outlives its trial. Checked against the parent pid to close the race with an early death."""
    parent = os.environ.get("TXLAB_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        os._exit(1)


def row_for(job: dict) -> dict:
    """The row of one job (`{"trial_key", "config", "mode", "precheck"}`): an estimate in estimate mode
    or when the precheck predicts the trial over its budget or over the memory free, else a measured run."""
    from txlab.config import config_from_flat

    cfg = config_from_flat(job["config"])
    if cfg.trial_key != job["trial_key"]:
        # The driver and this node resolve the same config differently: different txlab versions.
        raise RuntimeError(
            f"trial key mismatch: the driver planned {job['trial_key']}, this node resolves {cfg.trial_key} "
            "(is the same txlab version installed on every node?)"
        )
    from txlab.measure.estimate import estimate_trial, precheck
    from txlab.measure.trial import run_trial

    if job.get("mode", "measure") == "estimate":
        return estimate_trial(cfg)
    row = precheck(cfg) if job.get("precheck", True) else None
    return run_trial(cfg, progress=False) if row is None else row


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m txlab.sweeps.worker CONFIG.json ROW.json", file=sys.stderr)
        return 2
    config_path, row_path = argv
    _die_with_parent()
    with open(config_path) as f:
        job = json.load(f)
    row = row_for(job)
    tmp = f"{row_path}.tmp"
    with open(tmp, "w") as f:
        json.dump(row, f, default=str)
    os.replace(tmp, row_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
