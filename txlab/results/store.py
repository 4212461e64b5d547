"""The Parquet result store: a directory of one-row Parquet files, readable as one dataset.

Why one file per row: a row is then written whole or not at all (temporary file + rename on local
disk; a single PUT on object storage), a killed writer can never leave a half-written row inside a
file that also holds good rows, and replacing a trial's row (`--rerun-failed`) is "write the new file,
then delete the old one". Readers see a plain Parquet dataset: pyarrow.dataset and pandas read `DIR`,
polars and DuckDB read `DIR/*.parquet`; names starting with `_` (the marker, the lock, temporaries, the
quarantine folder) are ignored by them. The store directory holds rows only: plots and reports go
elsewhere (`txlab plot --out plots/NAME`; `refuse_output_in_store` keeps them out).

Layout (the same since txlab 0.1; txlab.results.layout names each file):
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

This module is the store as callers see it (the analysis reads only it and txlab.results.columns): `Store`,
`read_store`, `check_store`, and the names of the modules it is made of: where a store lives
(txlab.results.filesystem), the one writer (txlab.results.lock), rows as Parquet (txlab.results.parquet),
the integrity check (txlab.results.check), outputs kept out of stores (txlab.results.outputs), the file
names (txlab.results.layout) and the errors (txlab.results.errors).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from txlab.results.check import StoreCheck, check_files
from txlab.results.columns import FINAL_STATUSES, SCHEMA_VERSION, row_schema
from txlab.results.errors import StoreError, StoreLocked, warn
from txlab.results.filesystem import STALE_TMP_S, atomic_write, remove_stale_temporaries, resolve
from txlab.results.layout import (
    FORMAT,
    LEASE,
    LOCK,
    MARKER,
    QUARANTINE,
    TMP_PREFIX,
    RowFile,
    basename,
    parse_name,
    row_file_name,
)
from txlab.results.lock import (
    LEASE_FORMAT,
    LEASE_RENEW_S,
    LEASE_SETTLE_S,
    LEASE_TTL_S,
    WriterLease,
    local_lock,
)
from txlab.results.outputs import refuse_output_in_store, store_containing
from txlab.results.parquet import (
    dataset,
    fill_added_defaults,
    footer_schema_version,
    row_file_bytes,
    rows_to_table,
)
from txlab.text import first_line


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
            fs, root = resolve(str(uri))
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
        elif info.type == pafs.FileType.Directory and store.row_paths():
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
        meta = json.dumps({"format": FORMAT, "schema_version": SCHEMA_VERSION}).encode()
        atomic_write(self.fs, self.root, marker, meta, self.local)
        self.marker_version = SCHEMA_VERSION

    # --- writing ----------------------------------------------------------------------------

    def write_row(self, row: dict[str, Any]) -> str:
        """Write one row whole, then drop older rows of the same trial key. Returns the file path."""
        self._ensure_created()
        data = row_file_bytes(row)
        path = f"{self.root}/{row_file_name(row['trial_key'], time.time_ns())}"
        atomic_write(self.fs, self.root, path, data, self.local)
        # Every older file of this key, including leftovers of a writer killed between write and delete.
        for p in self.row_paths():
            old = parse_name(p)
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
        with local_lock(self.root, self.uri) if self.local else self._leased(), self._holding():
            yield self

    @contextlib.contextmanager
    def _leased(self) -> Iterator[None]:
        lease = WriterLease(self, self.lease_ttl_s, self.lease_renew_s, self.lease_settle_s)
        lease.acquire()
        self._lease = lease
        try:
            yield
        finally:
            self._lease = None
            lease.release()

    @contextlib.contextmanager
    def _holding(self) -> Iterator[None]:
        self._locked = True
        try:
            remove_stale_temporaries(self.fs, self.root)
            for path in list(self.damaged):
                self._set_aside(path)
            yield
        finally:
            self._locked = False

    def lock_lost(self) -> str | None:
        """Why this writer no longer holds its lease (object storage), or None while it does."""
        return self._lease.lost if self._lease is not None else None

    # --- damaged row files ------------------------------------------------------------------

    def _set_aside(self, path: str) -> str | None:
        """Move a damaged row file to DIR/_quarantine/ (a name every Parquet reader skips). Returns the new
        path, or None when it cannot be moved (it is then only skipped)."""
        dest = f"{self.root}/{QUARANTINE}/{basename(path)}"
        try:
            self.fs.create_dir(f"{self.root}/{QUARANTINE}", recursive=True)
            if self.fs.get_file_info(dest).type != pafs.FileType.NotFound:
                dest = f"{self.root}/{QUARANTINE}/{time.time_ns()}-{basename(path)}"
            self.fs.move(path, dest)
        except FileNotFoundError:
            self.damaged.pop(path, None)  # gone already (replaced by a rerun, or set aside by another writer)
            return None
        except OSError as e:
            warn(
                f"{self.uri}: cannot move the unreadable row file {basename(path)} to {QUARANTINE}/ ({first_line(e, 200)})"
            )
            return None
        return dest

    def _record_damage(self, path: str, error: BaseException) -> None:
        """One warning naming the file; a writer (holding the lock) also moves it to DIR/_quarantine/."""
        # pyarrow's message repeats the path ("Could not open Parquet input source '<path>': ..."): drop it
        self.damaged[path] = re.sub(r"^Could not open Parquet input source '[^']*': ", "", first_line(error, 400))[:200]
        moved = self._set_aside(path) if self._locked else None
        where = f"moved to {QUARANTINE}/" if moved else f"skipped (a sweep on this store moves it to {QUARANTINE}/)"
        warn(
            f"{self.uri}: row file {basename(path)} is unreadable ({self.damaged[path]}); {where}; the rest of the "
            "store reads, and a resumed sweep reruns its trial"
        )

    # --- reading ----------------------------------------------------------------------------

    def row_paths(self) -> list[str]:
        """Every Parquet file in the store's directory (row files, superseded and damaged ones too)."""
        sel = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        return [
            i.path for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File and i.path.endswith(".parquet")
        ]

    def row_files(self) -> list[RowFile]:
        """The newest readable row file of each trial key, oldest first."""
        files = [rf for p in self.row_paths() if (rf := parse_name(p)) and p not in self.damaged]
        # A writer killed between rename and delete leaves two files for one key: the newest wins.
        latest: dict[str, RowFile] = {}
        for rf in sorted(files, key=lambda r: r.time_ns):
            latest[rf.trial_key] = rf
        return sorted(latest.values(), key=lambda r: r.time_ns)

    def _dataset(self, paths: list[str]) -> pads.Dataset:
        # Every read of row files goes through here (tests replace it with a location that reads nowhere).
        return dataset(self.fs, paths)

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
        version = footer_schema_version(self.fs, path)
        if version is not None and version > SCHEMA_VERSION:  # None: the footer does not read either: damaged
            raise StoreError(
                f"{self.uri}: row file {basename(path)} has schema version {version}, newer than this txlab reads "
                f"({SCHEMA_VERSION}); upgrade txlab"
            )

    def read(self) -> pa.Table:
        """Every trial's row (the newest file of each key) as one table in today's schema. A row file that
        does not read is skipped with a warning (see the module docstring)."""
        vanished = 0
        while True:
            files = self.row_files()
            if not files:
                return row_schema().empty_table()
            try:
                return fill_added_defaults(self._dataset([rf.path for rf in files]).to_table())
            except FileNotFoundError:
                # A writer replaced a row between our listing and our read (a rerun trial): list again.
                vanished += 1
                if vanished == 3:
                    raise StoreError(f"{self.uri}: row files keep changing under the reader; retry") from None
            except (pa.ArrowException, OSError, ValueError) as e:
                # Some file does not read: find which, skip it and read the rest (listing again, so that
                # an older good file of that key, if any, takes its place).
                if not self._find_damage(files):
                    raise StoreError(f"{self.uri}: unreadable row files ({first_line(e, 200)})") from None

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
        return len(self.row_files())


def read_store(uri: str):
    """The store as a pandas DataFrame (one row per trial): what analysis reads."""
    return Store.open(uri).read_pandas()


def check_store(uri: str, filesystem: pafs.FileSystem | None = None) -> StoreCheck:
    """Check a store whole: the marker and its schema version (by opening it), every row file on its own
    (reads as Parquet in the store schema, exactly one row, a known status, the trial key its name says),
    and one row per trial key. Raises StoreError only when the store cannot be opened at all."""
    return check_files(Store.open(uri, filesystem=filesystem), str(uri))


__all__ = [
    "Store",
    "read_store",
    "check_store",
    "StoreCheck",
    "StoreError",
    "StoreLocked",
    "WriterLease",
    "RowFile",
    "rows_to_table",
    "refuse_output_in_store",
    "store_containing",
    "MARKER",
    "LOCK",
    "LEASE",
    "QUARANTINE",
    "TMP_PREFIX",
    "FORMAT",
    "LEASE_FORMAT",
    "STALE_TMP_S",
    "LEASE_TTL_S",
    "LEASE_RENEW_S",
    "LEASE_SETTLE_S",
]
