"""The integrity check of a whole store (`txlab.results.store.check_store`, which a sweep runs at its end):
every row file read on its own, one row per trial key, leftovers counted apart from problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa
import pyarrow.fs as pafs

from txlab.results.columns import SCHEMA_VERSION, STATUSES
from txlab.results.layout import QUARANTINE, TMP_PREFIX, RowFile, basename, parse_name
from txlab.results.parquet import dataset
from txlab.text import first_line


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


class OpenStore(Protocol):
    """What the check reads of an opened store (a `txlab.results.store.Store` is one)."""

    fs: pafs.FileSystem
    root: str

    def row_paths(self) -> list[str]: ...

    def row_files(self) -> list[RowFile]: ...

    def quarantined(self) -> list[str]: ...


def check_files(store: OpenStore, uri: str) -> StoreCheck:
    """Every row file of an opened store on its own (reads as Parquet in the store schema, exactly one row,
    a known status, the trial key its name says), and one row per trial key."""
    out = StoreCheck(uri=uri, problems=[], statuses={})
    raw = store.row_paths()
    newest = {rf.trial_key: rf.path for rf in store.row_files()}
    keys: dict[str, str] = {}
    for path in sorted(raw):
        name = basename(path)
        rf = parse_name(path)
        if rf is None:
            if not name.startswith(("_", ".")):
                out.problems.append(f"{name}: not a row file name (<trial_key>.<time_ns>.parquet)")
            continue
        out.files += 1
        if newest.get(rf.trial_key) != path:
            out.superseded += 1
            continue
        try:
            table = dataset(store.fs, [path]).to_table()
        except (pa.ArrowException, OSError, ValueError) as e:
            out.problems.append(f"{name}: unreadable ({first_line(e, 200)})")
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
    out.temporaries = sum(1 for i in store.fs.get_file_info(sel) if basename(i.path).startswith(TMP_PREFIX))
    out.quarantined = len(store.quarantined())
    return out
