"""The writer lock on object storage: a lease object with holder, token, renewal and expiry, on fsspec's
in-memory filesystem (no rename, no lock: what an object store offers). Two sweeps on one object-store
URI: the second is refused naming the holder; a crashed driver's lease expires; a lost lease stops the
writer."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import pyarrow.fs as pafs
import pytest

from tests.support import TINY_BASE
from txlab.cli import main
from txlab.results.store import LEASE, Store, StoreLocked, WriterLease

fsspec = pytest.importorskip("fsspec")
HOLDER = f"pid {os.getpid()} on {socket.gethostname()}"


@pytest.fixture
def fast_lease(monkeypatch):
    monkeypatch.setattr(Store, "lease_settle_s", 0.05)
    monkeypatch.setattr(Store, "lease_renew_s", 0.1)
    monkeypatch.setattr(Store, "lease_ttl_s", 0.6)


@pytest.fixture
def mem_root():
    """A fresh directory on fsspec's process-wide memory filesystem, removed afterwards."""
    mem = fsspec.filesystem("memory")
    top = f"/txlab-lease-{uuid.uuid4().hex[:8]}"
    yield mem, pafs.PyFileSystem(pafs.FSSpecHandler(mem)), f"{top}/store"
    if mem.exists(top):
        mem.rm(top, recursive=True)


def lease_object(mem, root) -> dict:
    return json.loads(mem.cat_file(f"{root}/{LEASE}"))


def test_second_writer_is_refused_naming_the_holder(mem_root, fast_lease):
    mem, fs, root = mem_root
    first = Store.open(root, create=True, filesystem=fs)
    with first.writer_lock():
        lease = lease_object(mem, root)
        assert lease["holder"] == HOLDER and lease["expires_at"] > time.time()
        with pytest.raises(
            StoreLocked, match=f"another txlab sweep is writing to this store \\({HOLDER}; lease renewed"
        ):
            with Store.open(root, filesystem=fs).writer_lock():
                pass
        assert first.lock_lost() is None
    assert not mem.exists(f"{root}/{LEASE}")  # released: deleted
    with Store.open(root, filesystem=fs).writer_lock():  # free again
        pass


def test_a_live_lease_is_renewed_and_keeps_the_store_past_its_ttl(mem_root, fast_lease):
    mem, fs, root = mem_root
    with Store.open(root, create=True, filesystem=fs).writer_lock():
        first = lease_object(mem, root)["renewed_at"]
        time.sleep(1.0)  # longer than the 0.6 s ttl: only renewal keeps it
        assert lease_object(mem, root)["renewed_at"] > first
        with pytest.raises(StoreLocked, match="expires in"):
            with Store.open(root, filesystem=fs).writer_lock():
                pass


def test_a_crashed_drivers_lease_expires_and_is_taken_over(mem_root, fast_lease, capsys):
    mem, fs, root = mem_root
    Store.open(root, create=True, filesystem=fs)._ensure_created()
    crashed = {
        "format": "txlab-writer-lease",
        "holder": "pid 4242 on lost-laptop",
        "token": "dead",
        "renewed_at": time.time() - 1.0,
        "expires_at": time.time() + 0.3,
    }
    mem.pipe_file(f"{root}/{LEASE}", json.dumps(crashed).encode())
    with pytest.raises(StoreLocked, match="pid 4242 on lost-laptop"):
        with Store.open(root, filesystem=fs).writer_lock():
            pass
    time.sleep(0.4)  # nobody renews it
    with Store.open(root, filesystem=fs).writer_lock():
        assert lease_object(mem, root)["holder"] == HOLDER
    assert "taking over the expired writer lease of pid 4242 on lost-laptop" in capsys.readouterr().err


def test_an_unreadable_lease_holds_nobody(mem_root, fast_lease):
    mem, fs, root = mem_root
    Store.open(root, create=True, filesystem=fs)._ensure_created()
    mem.pipe_file(f"{root}/{LEASE}", b"{half a json")
    with Store.open(root, filesystem=fs).writer_lock():
        assert lease_object(mem, root)["holder"] == HOLDER


def test_of_two_drivers_starting_at_once_exactly_one_keeps_the_lease(mem_root):
    """Both find the store free and write their lease; each reads it back after settling: only the later
    writer finds its own token, the other is refused naming it."""
    mem, fs, root = mem_root
    store = Store.open(root, create=True, filesystem=fs)
    store._ensure_created()
    leases = [WriterLease(store, ttl_s=30, renew_s=10, settle_s=0.5) for _ in range(2)]
    for i, lease in enumerate(leases):
        lease.holder = f"driver {i}"
    barrier = threading.Barrier(2)
    outcome: dict[int, str] = {}

    def contend(i: int) -> None:
        barrier.wait()
        try:
            leases[i].acquire()
            outcome[i] = "holds"
        except StoreLocked as e:
            outcome[i] = str(e)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sorted(outcome.values()).count("holds") == 1, outcome
        winner = next(i for i, v in outcome.items() if v == "holds")
        assert f"(driver {winner};" in outcome[1 - winner]
        assert lease_object(mem, root)["holder"] == f"driver {winner}"
    finally:
        for lease in leases:
            lease.release()


def test_a_lost_lease_is_noticed_by_the_holder(mem_root, fast_lease):
    mem, fs, root = mem_root
    store = Store.open(root, create=True, filesystem=fs)
    with store.writer_lock():
        other = {**lease_object(mem, root), "holder": "pid 7 on elsewhere", "token": "theirs"}
        mem.pipe_file(f"{root}/{LEASE}", json.dumps(other).encode())
        deadline = time.time() + 3
        while store.lock_lost() is None and time.time() < deadline:
            time.sleep(0.05)
        assert store.lock_lost() == "the writer lease was taken over by pid 7 on elsewhere"
    assert lease_object(mem, root)["token"] == "theirs"  # releasing leaves the new holder's lease alone


# --- two sweeps on one object-store URI --------------------------------------------------------------


def test_second_sweep_on_one_object_store_uri_is_refused_naming_the_holder(fast_lease, tmp_path, capsys):
    """`memory://` stands in for s3:// or gs:// (a non-local pyarrow filesystem, through fsspec). The second
    sweep plans, then is refused by the lease before it starts Ray: exit 2, one line naming the holder."""
    import yaml

    from txlab.sweeps.driver import run_sweep
    from txlab.sweeps.plan import plan
    from txlab.sweeps.spec import parse_spec

    uri = f"memory://txlab-lease-{uuid.uuid4().hex[:8]}/store"
    spec_raw = {"name": "t", "base": TINY_BASE, "grid": {"workload.seq_len": [64, 128]}}
    first = plan(parse_spec(spec_raw), uri)
    assert not first.store.local and len(first.to_run) == 2
    try:
        with first.store.writer_lock():
            second = plan(parse_spec(spec_raw), uri)
            with pytest.raises(StoreLocked, match=HOLDER):
                run_sweep(second)
            spec = tmp_path / "t.yaml"
            spec.write_text(yaml.safe_dump(spec_raw))
            assert main(["sweep", str(spec), "--store", uri]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"error: {uri}: another txlab sweep is writing to this store")
            assert HOLDER in err[0]
    finally:
        fsspec.filesystem("memory").rm(uri.split("://", 1)[1].rsplit("/", 1)[0], recursive=True)
