"""The Parquet result store: a directory of one-row Parquet files, readable as one dataset.

Why one file per row: a row is then written whole or not at all (temporary file + rename on local
disk; a single PUT on object storage), a killed writer can never leave a half-written row inside a
file that also holds good rows, and replacing a trial's row (`--rerun-failed`) is "write the new file,
then delete the old one". Readers see a plain Parquet dataset: pyarrow.dataset, pandas, polars and
DuckDB read `DIR/*.parquet`; names starting with `_` (the marker, temporaries) are ignored by them.

Layout:
    DIR/_txlab_store.json                 {"format": "txlab-store", "schema_version": N}
    DIR/<trial_key>.<time_ns>.parquet     one row each
    DIR/_txlab_writer.lock                held (flock) by the one writing sweep, local disk only

Locations: a local path, or a URI pyarrow's filesystems understand (`file:///abs/dir`, `s3://bucket/dir`,
`gs://bucket/dir`, ...); `Store.open(uri, filesystem=...)` also takes any `pyarrow.fs.FileSystem`, e.g.
`PyFileSystem(FSSpecHandler(fsspec_fs))`. On object storage a row file is one PUT (atomic there), so no
temporary file is used; `Store.writer_lock()` is only enforced on local disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from txlab.config import ConfigError
from txlab.results.columns import FINAL_STATUSES, SCHEMA_VERSION, STATUSES, row_schema

MARKER = "_txlab_store.json"
LOCK = "_txlab_writer.lock"
TMP_PREFIX = "_tmp-"
FORMAT = "txlab-store"
STALE_TMP_S = 600.0  # temporaries older than this are leftovers of a killed writer


class StoreError(ConfigError):
    """A store path or its content that cannot be used: bad input, exit 2."""


class StoreLocked(StoreError):
    """Another process holds the store's writer lock."""


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise StoreError(f"{uri}: cannot open store location ({e})") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


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


class Store:
    """Open with `Store.open(uri, create=...)`; every method is safe to call from one writer process."""

    def __init__(self, uri: str, fs: pafs.FileSystem, root: str):
        self.uri, self.fs, self.root = uri, fs, root.rstrip("/") or "/"
        self.local = isinstance(fs, pafs.LocalFileSystem)

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

    def _ensure_created(self) -> None:
        marker = f"{self.root}/{MARKER}"
        if self.fs.get_file_info(marker).type == pafs.FileType.File:
            return
        self.fs.create_dir(self.root, recursive=True)
        self._atomic_write(marker, json.dumps({"format": FORMAT, "schema_version": SCHEMA_VERSION}).encode())

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
        return path

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[Store]:
        """Hold the store's single-writer lock (a sweep holds it for its whole run).

        On local disk this is an flock on DIR/_txlab_writer.lock: the kernel drops it when the holder dies,
        even by SIGKILL, so a killed sweep never leaves a stale lock. Other filesystems have no lock
        (object stores offer none that is both cheap and safe); one writer there is the user's promise.
        Taking the lock also removes stale temporaries left by killed writers.
        """
        self._ensure_created()
        if not self.local:
            yield self
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
            self._remove_stale_temporaries()
            yield self
        finally:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # releases the flock

    def _remove_stale_temporaries(self) -> None:
        sel = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        now = time.time()
        for info in self.fs.get_file_info(sel):
            name = info.path.rsplit("/", 1)[-1]
            if info.type == pafs.FileType.File and name.startswith(TMP_PREFIX):
                mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
                if now - mtime > STALE_TMP_S:
                    try:
                        self.fs.delete_file(info.path)
                    except OSError:
                        pass

    # --- reading ----------------------------------------------------------------------------

    def _row_files_raw(self) -> list[str]:
        sel = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        return [
            i.path for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File and i.path.endswith(".parquet")
        ]

    def _row_files(self) -> list[RowFile]:
        files = [rf for p in self._row_files_raw() if (rf := _parse_name(p))]
        # A writer killed between rename and delete leaves two files for one key: the newest wins.
        latest: dict[str, RowFile] = {}
        for rf in sorted(files, key=lambda r: r.time_ns):
            latest[rf.trial_key] = rf
        return sorted(latest.values(), key=lambda r: r.time_ns)

    def read(self) -> pa.Table:
        schema = row_schema()
        for attempt in range(3):
            files = [rf.path for rf in self._row_files()]
            if not files:
                return schema.empty_table()
            try:
                # Row files written by older versions may lack newer columns: read them into today's schema.
                dataset = pads.dataset(files, schema=schema, format="parquet", filesystem=self.fs)
                return dataset.to_table()
            except FileNotFoundError:
                # A writer replaced a row between our listing and our read (a rerun trial): list again.
                if attempt == 2:
                    raise StoreError(f"{self.uri}: row files keep changing under the reader; retry") from None
            except (pa.ArrowInvalid, OSError) as e:
                raise StoreError(f"{self.uri}: unreadable row file ({e})") from None
        raise AssertionError("unreachable")

    def read_pandas(self):
        return self.read().to_pandas()

    def statuses(self) -> dict[str, str]:
        """trial_key -> status of its stored row."""
        table = self.read().select(["trial_key", "status"]).to_pylist()
        return {r["trial_key"]: r["status"] for r in table}

    def final_keys(self) -> set[str]:
        return {k for k, s in self.statuses().items() if s in FINAL_STATUSES}

    def __len__(self) -> int:
        return len(self._row_files())


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


# --- integrity ------------------------------------------------------------------------------------


@dataclass
class StoreCheck:
    """What `check_store` found. `problems` is empty for a sound store; superseded files (a writer killed
    between writing a trial's new row and deleting its old one) and temporaries are harmless leftovers that
    readers ignore, counted apart."""

    uri: str
    rows: int = 0  # trials with a readable row
    files: int = 0  # row files
    superseded: int = 0  # older row files of a key that has a newer one
    temporaries: int = 0  # _tmp-* files of writers that died mid-write
    statuses: dict[str, int] | None = None
    problems: list[str] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted((self.statuses or {}).items()))
        extra = "".join(
            [
                f", {self.superseded} superseded file(s)" if self.superseded else "",
                f", {self.temporaries} temporary file(s)" if self.temporaries else "",
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
    schema = row_schema()
    raw = store._row_files_raw()
    newest = {rf.trial_key: rf.path for rf in store._row_files()}
    keys: dict[str, str] = {}
    for path in sorted(raw):
        name = path.rsplit("/", 1)[-1]
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
            table = pads.dataset([path], schema=schema, format="parquet", filesystem=store.fs).to_table()
        except (pa.ArrowException, OSError, ValueError) as e:
            out.problems.append(f"{name}: unreadable ({str(e).splitlines()[0][:200]})")
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
    out.temporaries = sum(1 for i in store.fs.get_file_info(sel) if i.path.rsplit("/", 1)[-1].startswith(TMP_PREFIX))
    return out
