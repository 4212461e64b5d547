"""The Parquet result store: a directory of one-row Parquet files, readable as one dataset.

Why one file per row: a row is then written whole or not at all (temporary file + rename on local
disk; a single PUT on object storage), a killed writer can never leave a half-written row inside a
file that also holds good rows, and replacing a trial's row (`--rerun-failed`) is "write the new file,
then delete the old one". Readers see a plain Parquet dataset: pyarrow.dataset and pandas read `DIR`,
polars and DuckDB read `DIR/*.parquet`; names starting with `_` (the marker, the lock, temporaries, the
quarantine folder) are ignored by them. The store directory holds rows only: plots and reports go
elsewhere (`txlab plot --out plots/NAME`; `refuse_output_in_store` keeps them out).

Layout (the same since txlab 0.1):
    DIR/_txlab_store.json                 {"format": "txlab-store", "schema_version": N}
    DIR/<trial_key>.<time_ns>.parquet     one row each
    DIR/_txlab_writer.lock                held (flock) by the one writing sweep, local disk
    DIR/_txlab_writer.lease               held (lease object) by the one writing sweep, object storage
    DIR/_quarantine/<name>.parquet        row files that did not read, set aside by a writer

Locations: a local path, or a URI pyarrow's filesystems understand (`file:///abs/dir`, `s3://bucket/dir`,
`gs://bucket/dir`, ...), else one fsspec understands (`memory://dir`, ...); `Store.open(uri,
filesystem=...)` also takes any `pyarrow.fs.FileSystem`, e.g. `PyFileSystem(FSSpecHandler(fsspec_fs))`.
On object storage a row file is one PUT (atomic there), so no temporary file is used.

Damage: a row file that does not read (truncated, not Parquet) is skipped by readers with one warning
naming it, and moved to `_quarantine/` by the next writer (a sweep); its trial has no row, so a resumed
sweep reruns it. `check_store` reports it. Nothing else is lost.

Versions: the marker's `schema_version` is the newest row schema in the store (txlab.results.columns
SCHEMA_VERSION, history in SCHEMA_HISTORY). Rows of older versions read into today's schema, columns
they lack null; a store newer than this txlab is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from txlab.config import ConfigError
from txlab.results.columns import FINAL_STATUSES, SCHEMA_VERSION, STATUSES, added_defaults, row_schema

MARKER = "_txlab_store.json"
LOCK = "_txlab_writer.lock"
LEASE = "_txlab_writer.lease"
QUARANTINE = "_quarantine"
TMP_PREFIX = "_tmp-"
FORMAT = "txlab-store"
LEASE_FORMAT = "txlab-writer-lease"
STALE_TMP_S = 600.0  # temporaries older than this are leftovers of a killed writer

# The writer lease on object storage (see `WriterLease`): a crashed driver holds the store at most
# LEASE_TTL_S; a live one renews every LEASE_RENEW_S; a new holder waits LEASE_SETTLE_S after writing its
# lease and reads it back, so that of two drivers starting at once exactly one keeps it.
LEASE_TTL_S = 120.0
LEASE_RENEW_S = 30.0
LEASE_SETTLE_S = 3.0


class StoreError(ConfigError):
    """A store path or its content that cannot be used: bad input, exit 2."""


class StoreLocked(StoreError):
    """Another process holds the store's writer lock."""


_warned: set[str] = set()


def _warn(message: str) -> None:
    """One `warning:` line on stderr, once per process per message."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else e.__class__.__name__)[:limit]


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        first = e
    try:  # a scheme pyarrow does not know may be one fsspec knows (memory://, ...)
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(uri)
    except (ImportError, ValueError, OSError):
        raise StoreError(f"{uri}: cannot open store location ({first})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


@dataclass
class RowFile:
    path: str
    trial_key: str
    time_ns: int


def _parse_name(path: str) -> RowFile | None:
    name = path.rsplit("/", 1)[-1]
    if name.startswith(("_", ".")) or not name.endswith(".parquet"):
        return None
    parts = name[: -len(".parquet")].split(".")
    if len(parts) != 2 or not parts[1].isdigit():
        return None
    return RowFile(path, parts[0], int(parts[1]))


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


class Store:
    """Open with `Store.open(uri, create=...)`; every method is safe to call from one writer process."""

    # Writer lease timings on object storage (instances may override them, e.g. in tests).
    lease_ttl_s = LEASE_TTL_S
    lease_renew_s = LEASE_RENEW_S
    lease_settle_s = LEASE_SETTLE_S

    def __init__(self, uri: str, fs: pafs.FileSystem, root: str):
        self.uri, self.fs, self.root = uri, fs, root.rstrip("/") or "/"
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.marker_version: int | None = None  # schema_version the marker records (None: no marker yet)
        self.damaged: dict[str, str] = {}  # path -> why, row files that did not read (skipped by reads)
        self._locked = False  # this object holds the writer lock: damaged files are moved aside
        self._lease: WriterLease | None = None

    # --- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, uri: str, create: bool = False, filesystem: pafs.FileSystem | None = None) -> Store:
        """Open the store at `uri` (path or URI). With `filesystem`, `uri` is a path inside it."""
        if filesystem is not None:
            fs, root = filesystem, str(uri)
        else:
            fs, root = _resolve(str(uri))
        try:
            info = fs.get_file_info(root)
        except OSError as e:
            raise StoreError(f"{uri}: cannot reach store location ({e})") from None
        if info.type == pafs.FileType.File:
            raise StoreError(f"{uri}: store path is a file, expected a directory")
        store = cls(str(uri), fs, root)
        marker = f"{store.root}/{MARKER}"
        if fs.get_file_info(marker).type == pafs.FileType.File:
            store._check_marker(marker)
        elif info.type == pafs.FileType.Directory and store._row_files_raw():
            raise StoreError(f"{uri}: directory holds Parquet files but no {MARKER}; not a txlab store")
        elif info.type == pafs.FileType.Directory and not create:
            raise StoreError(f"{uri}: not a txlab store (no {MARKER})")
        elif not create:
            raise StoreError(f"{uri}: store not found")
        return store

    def _check_marker(self, marker: str) -> None:
        try:
            with self.fs.open_input_stream(marker) as f:
                meta = json.loads(f.read().decode())
        except (OSError, ValueError) as e:
            raise StoreError(f"{marker}: unreadable store marker ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreError(f"{marker}: foreign store format {meta!r}; expected format {FORMAT!r}")
        version = meta.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.uri}: store schema version {version!r} is newer than this txlab reads ({SCHEMA_VERSION}); upgrade txlab"
            )
        self.marker_version = version

    def _ensure_created(self) -> None:
        """Make the directory and its marker; a marker of an older schema version is raised to this one
        (the store now holds rows of this version: an older txlab then refuses it instead of misreading)."""
        marker = f"{self.root}/{MARKER}"
        if self.fs.get_file_info(marker).type == pafs.FileType.File:
            if self.marker_version is None:
                self._check_marker(marker)
            if self.marker_version < SCHEMA_VERSION:
                self._write_marker(marker)
            return
        self.fs.create_dir(self.root, recursive=True)
        self._write_marker(marker)

    def _write_marker(self, marker: str) -> None:
        self._atomic_write(marker, json.dumps({"format": FORMAT, "schema_version": SCHEMA_VERSION}).encode())
        self.marker_version = SCHEMA_VERSION

    # --- writing ----------------------------------------------------------------------------

    def _atomic_write(self, path: str, data: bytes) -> None:
        if not self.local:
            # Object stores publish an object whole when its upload completes: one write is atomic,
            # and a copy-based "rename" would only double the traffic.
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{self.root}/{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except OSError:
                pass
            raise

    def write_row(self, row: dict[str, Any]) -> str:
        """Write one row whole, then drop older rows of the same trial key. Returns the file path."""
        self._ensure_created()
        table = rows_to_table([row])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path = f"{self.root}/{row['trial_key']}.{time.time_ns()}.parquet"
        self._atomic_write(path, sink.getvalue().to_pybytes())
        # Every older file of this key, including leftovers of a writer killed between write and delete.
        for p in self._row_files_raw():
            old = _parse_name(p)
            if old and old.trial_key == row["trial_key"] and old.path != path:
                try:
                    self.fs.delete_file(old.path)
                except FileNotFoundError:
                    pass
                self.damaged.pop(old.path, None)
        return path

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[Store]:
        """Hold the store's single-writer lock (a sweep holds it for its whole run).

        On local disk this is an flock on DIR/_txlab_writer.lock: the kernel drops it when the holder dies,
        even by SIGKILL, so a killed sweep never leaves a stale lock. On any other filesystem (object
        storage) it is a lease object, DIR/_txlab_writer.lease (see `WriterLease`): renewed while the
        sweep runs, it expires `lease_ttl_s` after a crashed driver's last renewal.
        Taking the lock also removes stale temporaries left by killed writers and moves row files that
        did not read to DIR/_quarantine/.
        """
        self._ensure_created()
        if not self.local:
            lease = WriterLease(self, self.lease_ttl_s, self.lease_renew_s, self.lease_settle_s)
            lease.acquire()
            self._lease = lease
            try:
                with self._holding():
                    yield self
            finally:
                self._lease = None
                lease.release()
            return
        import fcntl

        path = f"{self.root}/{LOCK}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
                raise StoreLocked(f"{self.uri}: another txlab sweep is writing to this store ({holder})") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            with self._holding():
                yield self
        finally:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # releases the flock

    @contextlib.contextmanager
    def _holding(self) -> Iterator[None]:
        self._locked = True
        try:
            self._remove_stale_temporaries()
            for path in list(self.damaged):
                self._set_aside(path)
            yield
        finally:
            self._locked = False

    def lock_lost(self) -> str | None:
        """Why this writer no longer holds its lease (object storage), or None while it does."""
        return self._lease.lost if self._lease is not None else None

    def _remove_stale_temporaries(self) -> None:
        sel = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        now = time.time()
        for info in self.fs.get_file_info(sel):
            name = _name(info.path)
            if info.type == pafs.FileType.File and name.startswith(TMP_PREFIX):
                mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
                if now - mtime > STALE_TMP_S:
                    try:
                        self.fs.delete_file(info.path)
                    except OSError:
                        pass

    # --- damaged row files ------------------------------------------------------------------

    def _set_aside(self, path: str) -> str | None:
        """Move a damaged row file to DIR/_quarantine/ (a name every Parquet reader skips). Returns the new
        path, or None when it cannot be moved (it is then only skipped)."""
        dest = f"{self.root}/{QUARANTINE}/{_name(path)}"
        try:
            self.fs.create_dir(f"{self.root}/{QUARANTINE}", recursive=True)
            if self.fs.get_file_info(dest).type != pafs.FileType.NotFound:
                dest = f"{self.root}/{QUARANTINE}/{time.time_ns()}-{_name(path)}"
            self.fs.move(path, dest)
        except FileNotFoundError:
            self.damaged.pop(path, None)  # gone already (replaced by a rerun, or set aside by another writer)
            return None
        except OSError as e:
            _warn(f"{self.uri}: cannot move the unreadable row file {_name(path)} to {QUARANTINE}/ ({_first_line(e)})")
            return None
        return dest

    def _record_damage(self, path: str, error: BaseException) -> None:
        """One warning naming the file; a writer (holding the lock) also moves it to DIR/_quarantine/."""
        # pyarrow's message repeats the path ("Could not open Parquet input source '<path>': ..."): drop it
        self.damaged[path] = re.sub(r"^Could not open Parquet input source '[^']*': ", "", _first_line(error, 400))[
            :200
        ]
        moved = self._set_aside(path) if self._locked else None
        where = f"moved to {QUARANTINE}/" if moved else f"skipped (a sweep on this store moves it to {QUARANTINE}/)"
        _warn(
            f"{self.uri}: row file {_name(path)} is unreadable ({self.damaged[path]}); {where}; the rest of the "
            "store reads, and a resumed sweep reruns its trial"
        )

    # --- reading ----------------------------------------------------------------------------

    def _row_files_raw(self) -> list[str]:
        sel = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        return [
            i.path for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File and i.path.endswith(".parquet")
        ]

    def _row_files(self) -> list[RowFile]:
        files = [rf for p in self._row_files_raw() if (rf := _parse_name(p)) and p not in self.damaged]
        # A writer killed between rename and delete leaves two files for one key: the newest wins.
        latest: dict[str, RowFile] = {}
        for rf in sorted(files, key=lambda r: r.time_ns):
            latest[rf.trial_key] = rf
        return sorted(latest.values(), key=lambda r: r.time_ns)

    def _dataset(self, paths: list[str]) -> pads.Dataset:
        # Row files written by older versions may lack newer columns: read them into today's schema.
        return pads.dataset(paths, schema=row_schema(), format="parquet", filesystem=self.fs)

    def _find_damage(self, files: list[RowFile]) -> bool:
        """Read each file alone and record those that fail; True when one was found. A file whose bytes do
        not decode (ArrowInvalid: truncated, not Parquet, a value of the wrong type) is damaged. An I/O
        error counts only if it persists on a second try while other files read: when nothing reads, the
        location is the problem, not a file (the caller then fails as before)."""
        failed: dict[str, BaseException] = {}
        readable = 0
        for rf in files:
            try:
                self._dataset([rf.path]).to_table()
                readable += 1
            except FileNotFoundError:
                continue  # replaced meanwhile: the next listing has its successor
            except (pa.ArrowException, OSError, ValueError) as e:
                failed[rf.path] = e
        damaged = {path: e for path, e in failed.items() if isinstance(e, pa.ArrowInvalid)}
        if readable:
            for path in failed.keys() - damaged.keys():
                try:
                    self._dataset([path]).to_table()  # a second try: a transient I/O error passes
                except FileNotFoundError:
                    pass
                except (pa.ArrowException, OSError, ValueError) as again:
                    damaged[path] = again
        for path in damaged:
            self._refuse_if_newer(path)
        for path, e in damaged.items():
            self._record_damage(path, e)
        return bool(damaged)

    def _refuse_if_newer(self, path: str) -> None:
        """A row file that does not read into today's schema because a newer txlab wrote it (its footer says
        so) is not damage: refuse the store (upgrade txlab) rather than set good rows aside."""
        try:
            meta = pq.read_schema(path, filesystem=self.fs).metadata or {}
            version = int(meta.get(b"txlab.schema_version", b"0"))
        except (pa.ArrowException, OSError, ValueError):
            return  # the footer does not read either: damaged
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.uri}: row file {_name(path)} has schema version {version}, newer than this txlab reads "
                f"({SCHEMA_VERSION}); upgrade txlab"
            )

    def read(self) -> pa.Table:
        """Every trial's row (the newest file of each key) as one table in today's schema. A row file that
        does not read is skipped with a warning (see the module docstring)."""
        vanished = 0
        while True:
            files = self._row_files()
            if not files:
                return row_schema().empty_table()
            try:
                return _fill_added_defaults(self._dataset([rf.path for rf in files]).to_table())
            except FileNotFoundError:
                # A writer replaced a row between our listing and our read (a rerun trial): list again.
                vanished += 1
                if vanished == 3:
                    raise StoreError(f"{self.uri}: row files keep changing under the reader; retry") from None
            except (pa.ArrowException, OSError, ValueError) as e:
                # Some file does not read: find which, skip it and read the rest (listing again, so that
                # an older good file of that key, if any, takes its place).
                if not self._find_damage(files):
                    raise StoreError(f"{self.uri}: unreadable row files ({_first_line(e)})") from None

    def read_pandas(self):
        return self.read().to_pandas()

    def statuses(self) -> dict[str, str]:
        """trial_key -> status of its stored row."""
        table = self.read().select(["trial_key", "status"]).to_pylist()
        return {r["trial_key"]: r["status"] for r in table}

    def final_keys(self) -> set[str]:
        return {k for k, s in self.statuses().items() if s in FINAL_STATUSES}

    def quarantined(self) -> list[str]:
        """Paths of the row files set aside in DIR/_quarantine/."""
        sel = pafs.FileSelector(f"{self.root}/{QUARANTINE}", allow_not_found=True, recursive=False)
        return sorted(i.path for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File)

    def __len__(self) -> int:
        return len(self._row_files())


def _fill_added_defaults(table: pa.Table) -> pa.Table:
    """Rows of an older schema read a later config key as null: give them the key's default, which is what
    they ran with, so that old and new rows of the same computation group together in analysis."""
    for name, value in added_defaults().items():
        i = table.schema.get_field_index(name)
        if i >= 0 and table.column(i).null_count:
            filled = pc.fill_null(table.column(i), pa.scalar(value, table.schema.field(i).type))
            table = table.set_column(i, name, filled)
    return table


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    schema = row_schema()
    rows = list(rows)
    for row in rows:
        unknown = set(row) - set(schema.names)
        if unknown:
            raise ValueError(f"row has columns outside the store schema: {sorted(unknown)}")
        if row.get("status") not in STATUSES:
            raise ValueError(f"row status {row.get('status')!r} not in {STATUSES}")
        if not row.get("trial_key"):
            raise ValueError("row without trial_key")
    return pa.Table.from_pylist(rows, schema=schema)


def read_store(uri: str):
    """The store as a pandas DataFrame (one row per trial): what analysis reads."""
    return Store.open(uri).read_pandas()


# --- outputs stay out of stores -------------------------------------------------------------------


def store_containing(path: str | Path) -> str | None:
    """The local txlab store directory that `path` (a file or directory, existing or not) lies in, or None.
    Paths under a `_` or `.` folder of the store (which Parquet readers skip) do not count."""
    if "://" in str(path):
        return None
    p = Path(path).resolve()
    for d in [p, *p.parents]:
        if (d / MARKER).is_file():
            inside = p.relative_to(d).parts
            return None if inside and inside[0].startswith(("_", ".")) else str(d)
    return None


def refuse_output_in_store(out: str | Path, option: str = "--out") -> None:
    """Bad input (exit 2) when `out` lies inside a store: a store directory holds rows only, since
    pandas.read_parquet and pyarrow.dataset read every file under it."""
    root = store_containing(out)
    if root is not None:
        raise StoreError(
            f"{option} {out}: inside the txlab store {root}, which holds result rows only (Parquet readers read "
            f"every file in it); write outside it, e.g. {option} plots/{Path(root).name}"
        )


# --- the writer lease on object storage -----------------------------------------------------------


class WriterLease:
    """A store's writer lock where the filesystem has none (object storage): the object DIR/_txlab_writer.lease
    holds {holder, token, renewed_at, expires_at} (JSON, wall-clock seconds).

    Taking it: read the lease; a live one (expires_at in the future) held by someone else refuses, naming
    its holder. Otherwise write ours, wait `settle_s`, read it back: of two drivers that both found the
    store free, the later writer's lease is what both read back, so exactly one keeps it and the other is
    refused (this holds while a driver's read-to-write gap, one small GET and PUT, is under `settle_s`).
    Holding it: a daemon thread renews it every `renew_s`, after checking it is still ours; if it is not
    (another driver took it over after we failed to renew in time), `lost` says so and the sweep stops.
    Releasing: delete it if still ours. A crashed driver's lease expires `ttl_s` after its last renewal.
    Clocks of the machines involved must agree to well under `ttl_s` (NTP).

    Why not a conditional put: pyarrow's S3 and GCS filesystems, which the store uses, expose none; a lease
    needs only reads and whole-object writes, which every object store and pyarrow filesystem has.
    """

    def __init__(self, store: Store, ttl_s: float, renew_s: float, settle_s: float):
        self.store, self.path = store, f"{store.root}/{LEASE}"
        self.ttl_s, self.renew_s, self.settle_s = ttl_s, renew_s, settle_s
        self.token = uuid.uuid4().hex
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self.lost: str | None = None
        self._acquired_at = 0.0
        self._expires_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        """The lease object, None when there is none; an unreadable one reads as expired."""
        try:
            with self.store.fs.open_input_stream(self.path) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            lease = json.loads(data.decode())
            if not isinstance(lease, dict) or lease.get("format") != LEASE_FORMAT:
                raise ValueError("not a txlab writer lease")
            lease["expires_at"] = float(lease["expires_at"])
            lease["renewed_at"] = float(lease.get("renewed_at", lease["expires_at"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return {"token": None, "holder": "an unreadable lease", "expires_at": 0.0, "renewed_at": 0.0}
        return lease

    def _write(self) -> None:
        now = time.time()
        body = {
            "format": LEASE_FORMAT,
            "holder": self.holder,
            "token": self.token,
            "acquired_at": self._acquired_at or now,
            "renewed_at": now,
            "expires_at": now + self.ttl_s,
            "ttl_s": self.ttl_s,
        }
        with self.store.fs.open_output_stream(self.path) as f:
            f.write(json.dumps(body).encode())
        self._acquired_at = self._acquired_at or now
        self._expires_at = now + self.ttl_s

    def _refusal(self, lease: dict[str, Any]) -> StoreLocked:
        now = time.time()
        return StoreLocked(
            f"{self.store.uri}: another txlab sweep is writing to this store ({lease.get('holder') or 'unknown holder'}; "
            f"lease renewed {max(0.0, now - lease['renewed_at']):.0f} s ago, expires in "
            f"{max(0.0, lease['expires_at'] - now):.0f} s unless renewed)"
        )

    def acquire(self) -> None:
        current = self.read()
        if current is not None and current.get("token") != self.token and current["expires_at"] > time.time():
            raise self._refusal(current)
        if current is not None and current["expires_at"] <= time.time() and current.get("token") is not None:
            _warn(f"{self.store.uri}: taking over the expired writer lease of {current.get('holder')}")
        self._write()
        time.sleep(self.settle_s)
        current = self.read()
        if current is None or current.get("token") != self.token:
            if current is None:
                raise StoreLocked(f"{self.store.uri}: the writer lease vanished while taking it; another sweep? retry")
            raise self._refusal(current)
        self._thread = threading.Thread(target=self._renew_loop, name="txlab-store-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                current = self.read()
                if current is None or current.get("token") != self.token:
                    holder = current.get("holder") if current else None
                    self.lost = (
                        f"the writer lease was taken over by {holder}" if holder else "the writer lease was deleted"
                    )
                    return
                self._write()
            except OSError as e:
                if time.time() >= self._expires_at:
                    self.lost = f"the writer lease could not be renewed before it expired ({_first_line(e)})"
                    return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.renew_s + 5)
        try:
            current = self.read()
            if current is not None and current.get("token") == self.token:
                self.store.fs.delete_file(self.path)
        except OSError:
            pass  # it expires by itself


# --- integrity ------------------------------------------------------------------------------------


@dataclass
class StoreCheck:
    """What `check_store` found. `problems` is empty for a sound store; superseded files (a writer killed
    between writing a trial's new row and deleting its old one), temporaries and files already set aside in
    _quarantine/ are harmless leftovers that readers ignore, counted apart."""

    uri: str
    rows: int = 0  # trials with a readable row
    files: int = 0  # row files
    superseded: int = 0  # older row files of a key that has a newer one
    temporaries: int = 0  # _tmp-* files of writers that died mid-write
    quarantined: int = 0  # unreadable row files a writer moved to _quarantine/
    statuses: dict[str, int] | None = None
    problems: list[str] | None = None
    unreadable: list[str] = field(default_factory=list)  # names of row files that do not read (in problems too)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted((self.statuses or {}).items()))
        extra = "".join(
            [
                f", {self.superseded} superseded file(s)" if self.superseded else "",
                f", {self.temporaries} temporary file(s)" if self.temporaries else "",
                f", {self.quarantined} unreadable file(s) set aside in {QUARANTINE}/" if self.quarantined else "",
            ]
        )
        head = f"store check: {self.rows} rows ({counts or 'none'}){extra}"
        if self.ok:
            return head + "; every file reads, one row each, keys unique, schema version " + str(SCHEMA_VERSION)
        return head + f"; {len(self.problems)} problem(s): " + "; ".join(self.problems[:5])


def check_store(uri: str, filesystem: pafs.FileSystem | None = None) -> StoreCheck:
    """Check a store whole: the marker and its schema version (by opening it), every row file on its own
    (reads as Parquet in the store schema, exactly one row, a known status, the trial key its name says),
    and one row per trial key. Raises StoreError only when the store cannot be opened at all."""
    store = Store.open(uri, filesystem=filesystem)
    out = StoreCheck(uri=str(uri), problems=[], statuses={})
    raw = store._row_files_raw()
    newest = {rf.trial_key: rf.path for rf in store._row_files()}
    keys: dict[str, str] = {}
    for path in sorted(raw):
        name = _name(path)
        rf = _parse_name(path)
        if rf is None:
            if not name.startswith(("_", ".")):
                out.problems.append(f"{name}: not a row file name (<trial_key>.<time_ns>.parquet)")
            continue
        out.files += 1
        if newest.get(rf.trial_key) != path:
            out.superseded += 1
            continue
        try:
            table = store._dataset([path]).to_table()
        except (pa.ArrowException, OSError, ValueError) as e:
            out.problems.append(f"{name}: unreadable ({_first_line(e)})")
            out.unreadable.append(name)
            continue
        if table.num_rows != 1:
            out.problems.append(f"{name}: holds {table.num_rows} rows, expected 1")
            continue
        row = table.to_pylist()[0]
        if row["trial_key"] != rf.trial_key:
            out.problems.append(f"{name}: row's trial_key {row['trial_key']!r} differs from its file name")
        if row["status"] not in STATUSES:
            out.problems.append(f"{name}: unknown status {row['status']!r}")
        if row["trial_key"] in keys:
            out.problems.append(f"{name}: trial key {row['trial_key']} also in {keys[row['trial_key']]}")
        keys[row["trial_key"]] = name
        out.rows += 1
        out.statuses[row["status"]] = out.statuses.get(row["status"], 0) + 1
    sel = pafs.FileSelector(store.root, allow_not_found=True, recursive=False)
    out.temporaries = sum(1 for i in store.fs.get_file_info(sel) if _name(i.path).startswith(TMP_PREFIX))
    out.quarantined = len(store.quarantined())
    return out
