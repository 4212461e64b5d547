"""The Parquet result store: a directory of one-row Parquet files, readable as one dataset.

Why one file per row: a row is then written whole or not at all (temporary file + rename on local
disk; a single PUT on object storage), a killed writer can never leave a half-written row inside a
file that also holds good rows, and replacing a trial's row (`--rerun-failed`) is "write the new file,
then delete the old one". Readers see a plain Parquet dataset: pyarrow.dataset, pandas, polars and
DuckDB read `DIR/*.parquet`; names starting with `_` (the marker, temporaries) are ignored by them.

Layout:
    DIR/_txlab_store.json                 {"format": "txlab-store", "schema_version": N}
    DIR/<trial_key>.<time_ns>.parquet     one row each
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from txlab.columns import FINAL_STATUSES, SCHEMA_VERSION, STATUSES, row_schema
from txlab.config import ConfigError

MARKER = "_txlab_store.json"
FORMAT = "txlab-store"


class StoreError(ConfigError):
    """A store path or its content that cannot be used: bad input, exit 2."""


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
        self.uri, self.fs, self.root = uri, fs, root.rstrip("/")

    # --- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, uri: str, create: bool = False) -> "Store":
        fs, root = _resolve(str(uri))
        info = fs.get_file_info(root)
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
        tmp = f"{self.root}/_tmp-{uuid.uuid4().hex}"
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
        for old in self._row_files():
            if old.trial_key == row["trial_key"] and old.path != path:
                self.fs.delete_file(old.path)
        return path

    # --- reading ----------------------------------------------------------------------------

    def _row_files_raw(self) -> list[str]:
        sel = pafs.FileSelector(self.root, allow_not_found=True, recursive=False)
        return [i.path for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File and i.path.endswith(".parquet")]

    def _row_files(self) -> list[RowFile]:
        files = [rf for p in self._row_files_raw() if (rf := _parse_name(p))]
        # A writer killed between rename and delete leaves two files for one key: the newest wins.
        latest: dict[str, RowFile] = {}
        for rf in sorted(files, key=lambda r: r.time_ns):
            latest[rf.trial_key] = rf
        return sorted(latest.values(), key=lambda r: r.time_ns)

    def read(self) -> pa.Table:
        files = [rf.path for rf in self._row_files()]
        schema = row_schema()
        if not files:
            return schema.empty_table()
        try:
            # Row files written by older versions may lack newer columns: read them into today's schema.
            dataset = pads.dataset(files, schema=schema, format="parquet", filesystem=self.fs)
            return dataset.to_table()
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{self.uri}: unreadable row file ({e})") from None

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
