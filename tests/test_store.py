"""The Parquet row store: whole rows, one per trial key, readable as a plain dataset, on local disk and
through pyarrow filesystems (file:// URIs, fsspec's memory filesystem), with a single-writer lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from txlab.config import build_config
from txlab.results.columns import SCHEMA_VERSION, row_schema
from txlab.results.store import MARKER, TMP_PREFIX, Store, StoreError, StoreLocked, read_store


def make_row(seq_len: int = 64, status: str = "ok", peak: int | None = 1000, **extra):
    cfg = build_config({"model": {"n_layers": 2, "d_model": 64}, "workload": {"seq_len": seq_len}})
    row = dict.fromkeys(row_schema().names)
    row.update(cfg.flat())
    row.update(
        trial_key=cfg.trial_key, sweep="t", status=status, peak_bytes=peak, measured=True, host="h", device="cpu"
    )
    row.update(extra)
    return row


def parquet_files(path) -> list[str]:
    return sorted(p for p in os.listdir(path) if p.endswith(".parquet"))


def test_round_trip_and_plain_dataset(tmp_path):
    store = Store.open(str(tmp_path / "s"), create=True)
    assert len(store) == 0 and store.read().num_rows == 0
    store.write_row(make_row(64))
    store.write_row(make_row(128, status="over_budget", error="peak over budget"))
    table = store.read()
    assert table.schema.equals(row_schema(), check_metadata=False)
    assert sorted(table.column("workload.seq_len").to_pylist()) == [64, 128]
    assert store.statuses() == {make_row(64)["trial_key"]: "ok", make_row(128)["trial_key"]: "over_budget"}
    assert store.final_keys() == set(store.statuses())
    # any Parquet reader sees the directory as one dataset; marker, lock and temporaries are hidden
    (tmp_path / "s" / f"{TMP_PREFIX}leftover").write_bytes(b"partial")
    assert pads.dataset(str(tmp_path / "s"), format="parquet").to_table().num_rows == 2
    assert len(read_store(str(tmp_path / "s"))) == 2
    meta = (tmp_path / "s" / MARKER).read_text()
    assert f'"schema_version": {SCHEMA_VERSION}' in meta


def test_rewrite_replaces_the_row(tmp_path):
    store = Store.open(str(tmp_path / "s"), create=True)
    store.write_row(make_row(64, status="error", peak=None, error="boom"))
    store.write_row(make_row(64, status="ok"))
    assert len(parquet_files(tmp_path / "s")) == 1
    assert store.statuses() == {make_row(64)["trial_key"]: "ok"}


def test_leftover_duplicates_of_a_killed_writer(tmp_path):
    """A writer killed between writing a new row file and deleting the old one leaves two files for a key:
    readers see the newest only, and the next write of that key removes every older file."""
    store = Store.open(str(tmp_path / "s"), create=True)
    row = make_row(64, status="error", peak=None)
    first = store.write_row(row)
    second_name = f"{row['trial_key']}.{int(first.rsplit('.', 2)[1]) + 1}.parquet"
    table = pq.read_table(first)
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(["oom"]))
    pq.write_table(table, tmp_path / "s" / second_name)
    assert len(parquet_files(tmp_path / "s")) == 2
    assert store.statuses() == {row["trial_key"]: "oom"} and len(store) == 1
    store.write_row(make_row(64, status="ok"))
    assert len(parquet_files(tmp_path / "s")) == 1 and store.statuses() == {row["trial_key"]: "ok"}


def test_bad_rows_are_refused_whole(tmp_path):
    store = Store.open(str(tmp_path / "s"), create=True)
    with pytest.raises(ValueError, match="outside the store schema"):
        store.write_row({**make_row(), "nope": 1})
    with pytest.raises(ValueError, match="status"):
        store.write_row(make_row(status="fine"))
    with pytest.raises((pa.ArrowException, TypeError)):
        store.write_row(make_row(peak="lots"))  # wrong type: Arrow refuses, nothing is written
    assert parquet_files(tmp_path / "s") == []
    assert not [p for p in os.listdir(tmp_path / "s") if p.startswith(TMP_PREFIX)]


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="store not found"):
        Store.open(str(tmp_path / "missing"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a txlab store"):
        Store.open(str(tmp_path / "plain"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        Store.open(str(tmp_path / "file"), create=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"a": [1]}), foreign / "x.parquet")
    with pytest.raises(StoreError, match="no _txlab_store.json"):
        Store.open(str(foreign), create=True)
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / MARKER).write_text('{"format": "txlab-store", "schema_version": 999}')
    with pytest.raises(StoreError, match="newer than this txlab reads"):
        Store.open(str(newer))
    with pytest.raises(StoreError, match="cannot open store location"):
        Store.open("nosuchscheme://bucket/x")


def test_file_uri_store(tmp_path):
    uri = f"file://{tmp_path}/s"
    store = Store.open(uri, create=True)
    store.write_row(make_row(64))
    assert Store.open(uri).statuses() == Store.open(str(tmp_path / "s")).statuses()
    assert len(read_store(uri)) == 1
    with Store.open(uri).writer_lock():  # a file:// store is local disk: the lock applies
        with pytest.raises(StoreLocked):
            with Store.open(str(tmp_path / "s")).writer_lock():
                pass


def test_fsspec_memory_filesystem_store(monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    monkeypatch.setattr(Store, "lease_settle_s", 0.05)
    mem = fsspec.filesystem("memory")
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(mem))
    root = f"/txlab-test-{os.getpid()}/store"
    try:
        store = Store.open(root, create=True, filesystem=fs)
        assert not store.local
        with store.writer_lock():  # a lease object on object-store-like filesystems (tests/test_store_lease.py)
            store.write_row(make_row(64, status="error", peak=None))
            store.write_row(make_row(64, status="ok"))
            store.write_row(make_row(128))
        again = Store.open(root, filesystem=fs)
        assert sorted(again.statuses().values()) == ["ok", "ok"]
        names = [p.rsplit("/", 1)[-1] for p in mem.ls(root, detail=False)]
        assert sum(n.endswith(".parquet") for n in names) == 2
        assert not any(n.startswith(TMP_PREFIX) for n in names)  # one PUT per row, no temporaries
    finally:
        mem.rm(root.rsplit("/", 1)[0], recursive=True)


def test_writer_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    path = str(tmp_path / "s")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from txlab.results.store import Store
            with Store.open({path!r}, create=True).writer_lock():
                print("locked", flush=True)
                time.sleep(60)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLocked, match=f"pid {holder.pid}"):
            with Store.open(path).writer_lock():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with Store.open(path).writer_lock():  # SIGKILL released it: no stale lock
        pass


def test_lock_removes_stale_temporaries_only(tmp_path):
    store = Store.open(str(tmp_path / "s"), create=True)
    store.write_row(make_row())
    old, fresh = tmp_path / "s" / f"{TMP_PREFIX}old", tmp_path / "s" / f"{TMP_PREFIX}fresh"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    past = time.time() - 3600
    os.utime(old, (past, past))
    with store.writer_lock():
        pass
    assert not old.exists() and fresh.exists()


def test_check_store_finds_every_kind_of_damage(tmp_path):
    from txlab.results.store import check_store

    root = tmp_path / "s"
    store = Store.open(str(root), create=True)
    paths = [store.write_row(make_row(n, status=s)) for n, s in ((64, "ok"), (128, "oom"), (256, "error"))]
    good = check_store(str(root))
    assert good.ok and good.rows == 3 and good.statuses == {"ok": 1, "oom": 1, "error": 1}
    assert "store check: 3 rows (error 1, ok 1, oom 1); every file reads" in good.summary()

    # harmless leftovers: an older file of a key (writer killed between rename and delete), a temporary
    key = make_row(64)["trial_key"]
    t = int(paths[0].rsplit(".", 2)[1])
    pq.write_table(pq.read_table(paths[0]), root / f"{key}.{t - 1}.parquet")
    (root / f"{TMP_PREFIX}dead").write_bytes(b"PAR1 half")
    leftovers = check_store(str(root))
    assert leftovers.ok and leftovers.rows == 3 and leftovers.superseded == 1 and leftovers.temporaries == 1

    # damage: a truncated file, a row whose key is not its file name, a file of two rows, a stray name
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[: len(data) // 2])
    other = make_row(512)
    pq.write_table(pa.Table.from_pylist([other], schema=row_schema()), root / f"{'f' * 16}.1.parquet")
    pq.write_table(
        pa.Table.from_pylist([make_row(1024), make_row(2048)], schema=row_schema()), root / f"{'e' * 16}.1.parquet"
    )
    (root / "notes.parquet").write_bytes(b"x")
    bad = check_store(str(root))
    assert not bad.ok and bad.rows == 3  # 64, 256 and the misnamed one read; the truncated one does not
    text = " | ".join(bad.problems)
    assert f"{os.path.basename(paths[1])}: unreadable" in text
    assert f"{'f' * 16}.1.parquet: row's trial_key {other['trial_key']!r} differs from its file name" in text
    assert f"{'e' * 16}.1.parquet: holds 2 rows, expected 1" in text
    assert "notes.parquet: not a row file name" in text
    assert "4 problem(s)" in bad.summary()
