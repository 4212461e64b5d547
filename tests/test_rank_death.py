"""A rank that dies mid-step ends its trial as an `error` row naming it, within a bounded time, with no
rank left running; and every process group a trial's ranks make has a collective timeout, so a rank
waiting on a peer that is alive but stuck fails instead of waiting forever (the backstop behind the
launcher, which stops the others GRACE_S after one ends badly)."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch

from tests.support import SHARDED, cfg
from txlab.parallel.launch import GRACE_S, JOIN_S, spawn_ranks

# The test's own files (ranks' pids, the moment of the kill), handed to the spawned ranks by environment
DIR_ENV = "TXLAB_TEST_RANK_DEATH_DIR"
VICTIM, KILL_AT_BLOCK = 2, 2  # rank 2 of 4 dies as its second block's forward starts: mid-step


def _rank_that_dies(rank: int, world: int, *args) -> dict:
    """txlab's own rank (txlab.trial.sharded._rank_main), with rank VICTIM SIGKILLed as its KILL_AT_BLOCK-th
    block's forward starts: after the first step's first collectives (the root's and block 0's FSDP
    all-gathers, block 0's TP collectives), so its peers are inside the step."""
    from txlab.model.gpt import Block
    from txlab.trial.sharded import _rank_main

    here = Path(os.environ[DIR_ENV])
    (here / f"rank{rank}.pid").write_text(str(os.getpid()))
    if rank == VICTIM:
        seen = []

        def die(module, inputs):
            if isinstance(module, Block):
                seen.append(module)
                if len(seen) == KILL_AT_BLOCK:
                    (here / "killed_at").write_text(repr(time.monotonic()))  # system-wide clock
                    os.kill(os.getpid(), 9)

        torch.nn.modules.module.register_module_forward_pre_hook(die)
    return _rank_main(rank, world, *args)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(300)
def test_a_rank_killed_mid_step_ends_a_four_rank_tp_trial_as_an_error_row_naming_it(tmp_path, monkeypatch):
    from txlab.trial import run_trial

    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    monkeypatch.setattr("txlab.trial.sharded._rank_main", _rank_that_dies)  # spawned by reference: this module's
    c = cfg(SHARDED, parallel__fsdp=2, parallel__tp=2, workload__steps=2)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    row = run_trial(c)
    ended = time.monotonic()
    assert row["status"] == "error", row
    assert row["error"] == f"rank {VICTIM} of 4 died (killed by signal 9 (SIGKILL))", row["error"]
    # From the kill: the launcher sees the exit within a poll, lets the others end on their own for GRACE_S,
    # SIGTERMs what is left and waits JOIN_S (all together), SIGKILLs the rest; the merge and the row are
    # milliseconds. 10 s on top for a loaded machine's scheduling; start-up (4 processes importing torch on
    # 2 cores) is before the kill and not bounded here (the test's own timeout bounds it).
    after_kill = ended - float((tmp_path / "killed_at").read_text())
    print(f"trial ended {after_kill:.2f} s after the kill")
    assert 0 < after_kill <= GRACE_S + JOIN_S + 10, after_kill
    pids = [int((tmp_path / f"rank{r}.pid").read_text()) for r in range(4)]
    assert not [p for p in pids if _alive(p)], "a rank outlived its trial"
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not [p for p in left if _alive(p) and "resource_tracker" not in " ".join(psutil.Process(p).cmdline())]


def _collective_with_a_stuck_peer(rank: int, world: int, here: str) -> dict:
    """Ranks 0 and 1 form a TP group of a 2 x 2 mesh; rank 1 never joins rank 0's all-reduce in it (alive,
    as a hung peer would be), until rank 0 is done. Rank 0: how its all-reduce ended and after how long."""
    import torch.distributed as dist

    from txlab.parallel.fsdp import make_ranks
    from txlab.trial.sharded import bound_collectives

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    ranks = make_ranks(rank, 2, 2, "cpu")
    bound_collectives(ranks.mesh, timedelta(seconds=2))
    done = Path(here) / "done"
    if rank == 0:
        t0 = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=ranks.tp_mesh.get_group())
            how = "completed"
        except RuntimeError as e:
            how = f"failed: {e}"
        done.write_text("1")
        return {"how": how, "waited_s": time.monotonic() - t0}
    if rank == 1:
        deadline = time.monotonic() + 120
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    return {}


@pytest.mark.timeout(300)
def test_every_group_of_a_2d_mesh_fails_a_collective_on_a_stuck_peer_after_its_timeout(tmp_path):
    out = spawn_ranks(_collective_with_a_stuck_peer, 4, (str(tmp_path),))
    assert all(isinstance(r, dict) for r in out), out
    # torch's default for a mesh's sub-group is 30 minutes on gloo: without bound_collectives rank 0 waits
    # until rank 1 gives up (120 s) and its all-reduce then fails on the closed connection
    assert "Timed out waiting 2000ms" in out[0]["how"], out[0]
    assert out[0]["waited_s"] < 60, out[0]
