"""Faults while a sweep writes its store: a full disk (a real one: a small tmpfs, when this process may
mount one; else the same failure injected into the driver's writes), and a second sweep on the same store.

The driver SIGKILLed repeatedly and a trial process SIGKILLed from outside: tests/test_sweeps.py; a worker
node stopped mid-sweep: tests/test_sweeps_cluster.py; the integrity check itself: tests/test_store.py.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO, kill_session, row_files, txlab_env, write_spec
from txlab.results.store import TMP_PREFIX, Store, check_store

# The driver, started as `python -c DRIVER sweep ...`: with TXLAB_TEST_ENOSPC_AFTER=N its row writes fail
# with ENOSPC after N rows, the way a full disk fails them (used where no tmpfs can be mounted).
DRIVER = """
import errno, os, sys
after = int(os.environ.get("TXLAB_TEST_ENOSPC_AFTER", "-1"))
if after >= 0:
    from txlab.results import store
    real, done = store.Store.write_row, []
    def write_row(self, row):
        if len(done) >= after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.uri)
        done.append(row["trial_key"])
        return real(self, row)
    store.Store.write_row = write_row
from txlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_driver(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount") or os.environ.get("TXLAB_TEST_INJECT_ENOSPC"):
        return False
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def fill(disk: Path) -> Path:
    """Write zeros until the filesystem is full."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with open(filler, "ab", buffering=0) as f:  # the last bytes too
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass
    return filler


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_full_disk_stops_the_sweep_cleanly_and_a_second_sweep_is_refused(tmp_path, record_property):
    disk = tmp_path / "disk"
    real_disk = mount_tmpfs(disk, "8m")  # TXLAB_TEST_INJECT_ENOSPC=1 forces the injected variant
    record_property("full_disk", "tmpfs" if real_disk else "injected ENOSPC")
    if not real_disk:
        disk.mkdir(exist_ok=True)
    store = disk / "store"
    grid = {"workload.seq_len": [64, 96, 128]}
    spec = write_spec(tmp_path / "t.yaml", grid, max_concurrent=1, precheck=False)
    env = txlab_env()
    if not real_disk:
        env["TXLAB_TEST_ENOSPC_AFTER"] = "1"
    args = ["sweep", str(spec), "--store", str(store)]
    try:
        driver = start_driver(args, env)
        try:
            deadline = time.monotonic() + 240
            while not row_files(store) and time.monotonic() < deadline and driver.poll() is None:
                time.sleep(0.2)
            assert len(row_files(store)) == 1, "the first row should have landed"
            # The driver writes every row: stopped, it lands none while the second sweep starts and the disk fills
            # (running, the next trial's row landed first under load: 2 rows, once in CI at load ~4).
            os.kill(driver.pid, signal.SIGSTOP)
            try:
                # a second sweep on the same store, while the first holds it: refused at once, nothing written
                second = subprocess.run(
                    [sys.executable, "-m", "txlab", *args],
                    env=txlab_env(),
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert second.returncode == 2, second.stderr
                assert second.stderr.strip().splitlines() == [
                    f"error: {store}: another txlab sweep is writing to this store (pid {driver.pid} on "
                    f"{os.uname().nodename})"
                ]
                assert len(row_files(store)) == 1
                filler = fill(disk) if real_disk else None
            finally:
                os.kill(driver.pid, signal.SIGCONT)
            out, err = driver.communicate(timeout=240)
        finally:
            kill_session(driver.pid)
        assert driver.returncode == 1, out + err
        lines = err.strip().splitlines()
        assert lines[-1].startswith(f"error: store {store}: cannot write the row of trial "), err
        assert "No space left on device" in lines[-1] and "rerun the same command to resume" in lines[-1]
        assert "Traceback" not in err
        kept = row_files(store)
        assert len(kept) == 1
        check = check_store(str(store))
        assert check.ok and check.rows == 1 and check.temporaries == 0, check.summary()
        assert not [p for p in store.iterdir() if p.name.startswith(TMP_PREFIX)]

        # space again: the same command resumes, the stored row stays as it was
        if filler is not None:
            filler.unlink()
        env.pop("TXLAB_TEST_ENOSPC_AFTER", None)
        resumed = start_driver(args, env)
        try:
            out, err = resumed.communicate(timeout=300)
        finally:
            kill_session(resumed.pid)
        assert resumed.returncode == 0, out + err
        assert "3 trials, 1 already in the store, 2 to run" in out
        assert "store check: 3 rows (ok 3); every file reads" in out
        rows = Store.open(str(store)).read().to_pylist()
        assert len(rows) == 3 and len({r["trial_key"] for r in rows}) == 3 and {r["status"] for r in rows} == {"ok"}
        assert set(kept) <= set(row_files(store)) and len(row_files(store)) == 3
    finally:
        if real_disk:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_run_with_a_full_store_prints_the_row_and_fails_cleanly(tmp_path, monkeypatch, capsys):
    """`txlab run --store`: the trial's row still reaches stdout, one line says the store refused it."""
    import json

    from txlab.cli import main
    from txlab.config import build_config
    from txlab.sweeps.rows import error_row

    cfg = build_config({"model": {"n_layers": 2, "d_model": 64}})
    row = {**error_row(cfg.trial_key, cfg.flat(), None, ""), "status": "ok", "error": None}
    monkeypatch.setattr("txlab.trial.run_trial", lambda cfg, progress=True: row)

    def full(self, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.uri)

    monkeypatch.setattr(Store, "write_row", full)
    (tmp_path / "c.yaml").write_text("model: {n_layers: 2, d_model: 64}\n")
    rc = main(["run", str(tmp_path / "c.yaml"), "--store", str(tmp_path / "s"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 1 and json.loads(out)["trial_key"] == cfg.trial_key
    assert err.strip().splitlines() == [
        f"error: store {tmp_path / 's'}: cannot write the row (No space left on device); nothing was written"
    ]
    assert not (tmp_path / "s").exists()


def test_trial_process_crashing_in_native_code_is_an_error_row(tmp_path):
    """A segfault in the trial process (native code: a kernel, a driver) is that trial's `error` row."""
    from txlab.config import build_config
    from txlab.sweeps.actor import run_in_subprocess

    cfg = build_config({"model": {"n_layers": 2, "d_model": 64}})
    crash = tmp_path / "python"
    crash.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import ctypes; ctypes.string_at(0)'\n")
    crash.chmod(0o755)
    row = run_in_subprocess(cfg.trial_key, cfg.flat(), "t", python=str(crash))
    assert row["status"] == "error" and row["trial_key"] == cfg.trial_key
    assert row["error"].startswith("trial process killed by SIGSEGV"), row["error"]
    Store.open(str(tmp_path / "s"), create=True).write_row(row)
    assert check_store(str(tmp_path / "s")).ok
