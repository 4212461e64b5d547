"""N ranks of one trial as N processes on this machine (torch.multiprocessing, spawn), each told its
rank and a free loopback port; each writes one JSON result. When any rank ends badly (a non-zero exit, a
signal, or a result whose status says the trial cannot go on) the others are stopped: a rank blocked in
a collective with a dead peer would otherwise wait for the process group's timeout. No rank outlives
`spawn_ranks`: from the moment a rank is seen ending badly, the call returns within GRACE_S + JOIN_S (plus
the SIGKILL of whatever ignored SIGTERM, and a poll).
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
JOIN_S = 5.0  # then the ranks still running get this long, all together, to end on SIGTERM before SIGKILL


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
        stop_at, culprit, signalled = None, None, set()
        try:
            while any(p.is_alive() for p in procs):
                if culprit is None:
                    culprit = _first_bad(procs, outs, bad)
                    if culprit is not None:
                        stop_at = time.monotonic() + GRACE_S
                if stop_at is not None and time.monotonic() > stop_at:
                    break
                time.sleep(0.05)
        finally:
            signalled = _stop(procs)
        return [_outcome(p, _read(outs[r]), culprit if r in signalled else None) for r, p in enumerate(procs)]


def _read(path: str) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _first_bad(procs: list, outs: list[str], bad: Callable[[dict], bool]) -> int | None:
    """The rank to blame among those that have ended badly so far: one that died without a result first
    (when a rank is killed, its peers fail in their next collective and may be seen in the same poll)."""
    ended = [(r, _read(outs[r])) for r, p in enumerate(procs) if p.exitcode is not None]
    badly = [(result is not None, r) for r, result in ended if procs[r].exitcode != 0 or result is None or bad(result)]
    return min(badly)[1] if badly else None


def _stop(procs: list) -> set[int]:
    """SIGTERM the ranks still running, SIGKILL those alive JOIN_S later; reap all. Returns the ranks signalled."""
    signalled = {r for r, p in enumerate(procs) if p.is_alive()}
    for r in signalled:
        procs[r].terminate()
    deadline = time.monotonic() + JOIN_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return signalled


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


def _outcome(p, result: dict[str, Any] | None, stopped_after: int | None) -> dict[str, Any] | str:
    """A rank's dict, else how it ended; `stopped_after`: the culprit, when this launcher signalled the rank
    (a rank killed by anyone else is reported as killed, so a dead rank is never taken for a stopped one)."""
    if result is not None:
        return result
    if stopped_after is not None:
        return stopped(stopped_after)
    return exit_text(p.exitcode)
