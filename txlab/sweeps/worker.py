"""One trial in a fresh process: `python -m txlab.sweeps.worker CONFIG.json ROW.json`.

The Ray Tune trial (an actor) starts this process and waits for it, so that a trial's allocator state,
leaks, CUDA context and any crash (a segfault, the kernel's OOM killer) stay in a process of its own:
the actor survives to report an `error` row, and only the failures Ray itself sees (a lost node, a
killed actor) reach Tune's retry logic (FailureConfig).

CONFIG.json holds the trial's flat config, the spec's mode and precheck; ROW.json receives the row written
by `txlab.trial.run_trial`, or by `txlab.trial.estimate_trial` when the precheck predicts the trial
over its budget or over the memory free (then it is not run). Estimate-mode sweeps call `row_for` in
the (reused) actor instead: fake tensors allocate nothing, so a process per estimate buys no isolation,
only a torch import per trial.

One rank of a sharded trial placed by Ray (`parallel.fsdp` = N > 1, txlab.sweeps.ranks) runs here too: its
job adds `rank`, `world`, `master` (rank 0's host and port), `local_rank`, `threads` and `ranks_here`
(ranks of the trial on this machine); ROW.json receives the rank's row (`txlab.trial.sharded.run_rank`),
or its precheck's when the estimate of one rank is over its budget or its share of the memory free.
Exit status 0 when the row was written (whatever its status), 1 otherwise (traceback on stderr).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

# How much of a finished process's stderr the caller keeps (the `error` message of a row quotes its end).
STDERR_TAIL_CHARS = 1500


# --- the caller's side: start this module in a fresh process and wait for it ---------------------


@dataclass
class Finished:
    """How a worker process ended: its exit status (negative: the signal), its row if it wrote one, and the
    end of its stderr."""

    returncode: int
    row: dict[str, Any] | None
    stderr_tail: str

    def last_line(self) -> str:
        lines = [ln.strip() for ln in self.stderr_tail.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


def pythonpath() -> str:
    """The directory holding the `txlab` package this process imported, first on the path, so the worker
    runs the same code (a `ray job submit --working-dir` upload or an install)."""
    import txlab

    here = os.path.dirname(os.path.dirname(os.path.abspath(txlab.__file__)))
    rest = os.environ.get("PYTHONPATH")
    return os.pathsep.join([here] + ([rest] if rest else []))


def run_worker(job: dict, python: str | None = None, tag: str = "trial", echo: bool = False) -> Finished:
    """Run `job` in `python -m txlab.sweeps.worker` (a fresh process that dies with this one) and wait.
    `tag` names its temporary directory (txlab-TAG-...: visible in its command line); `echo` copies its
    stderr to this process's stderr as it comes (Ray keeps an actor's stderr in the node's worker logs)."""
    with tempfile.TemporaryDirectory(prefix=f"txlab-{tag}-") as tmp:
        config_path, row_path = os.path.join(tmp, "config.json"), os.path.join(tmp, "row.json")
        with open(config_path, "w") as f:
            json.dump(job, f)
        env = dict(os.environ, PYTHONPATH=pythonpath(), TXLAB_PARENT_PID=str(os.getpid()))
        tail = bytearray()
        proc = subprocess.Popen(
            [python or sys.executable, "-m", "txlab.sweeps.worker", config_path, row_path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )

        def drain() -> None:
            for chunk in iter(lambda: proc.stderr.read1(65536), b""):
                tail.extend(chunk)
                del tail[: max(0, len(tail) - 4 * STDERR_TAIL_CHARS)]
                if echo:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        returncode = proc.wait()
        reader.join(10)
        row = None
        if returncode == 0 and os.path.exists(row_path):
            with open(row_path) as f:
                row = json.load(f)
    text = bytes(tail)[-STDERR_TAIL_CHARS:].decode(errors="replace").strip()
    return Finished(returncode, row, text)


# --- the worker process ---------------------------------------------------------------------------


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


def trial_config(trial_key: str, flat: dict[str, Any]):
    """The trial config the driver planned as `trial_key`, rebuilt from its flat keys on this node; raises
    when this node resolves it to another key (a different txlab version is installed here)."""
    from txlab.config import config_from_flat

    cfg = config_from_flat(flat)
    if cfg.trial_key != trial_key:
        raise RuntimeError(
            f"trial key mismatch: the driver planned {trial_key}, this node resolves {cfg.trial_key} "
            "(is the same txlab version installed on every node?)"
        )
    return cfg


def row_for(job: dict) -> dict:
    """The row of one job (`{"trial_key", "config", "mode", "precheck"}`): an estimate in estimate mode
    or when the precheck predicts the trial over its budget or over the memory free, else a measured run."""
    from txlab.trial import estimate_trial, precheck, run_trial

    cfg = trial_config(job["trial_key"], job["config"])
    if job.get("mode", "measure") == "estimate":
        return estimate_trial(cfg)
    if "rank" in job:
        return rank_row(cfg, job)
    row = precheck(cfg) if job.get("precheck", True) else None
    return run_trial(cfg, progress=False) if row is None else row


def rank_row(cfg, job: dict) -> dict:
    """One rank of a sharded trial: its precheck (one rank's estimate, on the fake process group of N,
    against its share of this machine's memory when `ranks_here` ranks of the trial run here), then its
    share of the measured run."""
    from txlab.trial import precheck
    from txlab.trial.sharded import run_rank

    row = precheck(cfg, job.get("ranks_here", 1)) if job.get("precheck", True) else None
    if row is not None:
        return row
    master = (job["master"][0], int(job["master"][1]))
    return run_rank(cfg, job["rank"], job["world"], master, job.get("local_rank"), job.get("threads"))


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
