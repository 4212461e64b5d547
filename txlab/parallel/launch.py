"""N ranks of one trial as N processes on this machine (torch.multiprocessing, spawn), each told its
rank and a free loopback port; each writes one JSON result. When any rank ends badly (a non-zero exit, a
signal, or a result whose status says the trial cannot go on) the others are stopped: a rank blocked in
a collective with a dead peer would otherwise wait for the process group's timeout. No rank outlives
`spawn_ranks`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GRACE_S = 3.0  # after a rank ends badly, the others get this long to finish on their own


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(target: Callable, rank: int, world: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    result = target(rank, world, *args)
    tmp = f"{out}.tmp"
    Path(tmp).write_text(json.dumps(result, default=str))
    os.replace(tmp, out)


def spawn_ranks(
    target: Callable[..., dict[str, Any]], world: int, args: tuple = (), bad: Callable[[dict], bool] = lambda r: False
) -> list[dict[str, Any] | str]:
    """Run `target(rank, world, *args) -> dict` in `world` processes; per rank, its dict, or a string
    saying how it ended without one ("exit code 1", "killed by signal 9", "stopped: rank 1 ended").
    `bad(result)`: a finished rank's result that should stop the others (e.g. an out-of-memory status)."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="txlab-ranks-") as tmp:
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        procs = [ctx.Process(target=_entry, args=(target, r, world, port, outs[r], args)) for r in range(world)]
        for p in procs:
            p.start()
        stop_at, culprit = None, None
        try:
            while any(p.is_alive() for p in procs):
                for r, p in enumerate(procs):
                    if p.exitcode is None or culprit is not None:
                        continue
                    result = _read(outs[r])
                    if p.exitcode != 0 or result is None or bad(result):
                        culprit, stop_at = r, time.monotonic() + GRACE_S
                if stop_at is not None and time.monotonic() > stop_at:
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5)
                if p.is_alive():
                    p.kill()
                    p.join()
        return [_outcome(p, _read(outs[r]), r, culprit) for r, p in enumerate(procs)]


def _read(path: str) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def stopped(culprit: int) -> str:
    """The outcome of a rank stopped because rank `culprit` ended badly (merge_ranks looks past these)."""
    return f"stopped after rank {culprit} ended"


def exit_text(exitcode: int | None) -> str:
    """How a rank process that left no result ended: "killed by signal 9 (SIGKILL)", "exit code 1"."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _outcome(p, result: dict[str, Any] | None, rank: int, culprit: int | None) -> dict[str, Any] | str:
    if result is not None:
        return result
    if p.exitcode is not None and p.exitcode < 0 and rank != culprit and culprit is not None:
        return stopped(culprit)
    return exit_text(p.exitcode)
