"""The names inside a store directory (the same since txlab 0.1):

    DIR/_txlab_store.json                 {"format": "txlab-store", "schema_version": N}
    DIR/<trial_key>.<time_ns>.parquet     one row each
    DIR/_txlab_writer.lock                held (flock) by the one writing sweep, local disk
    DIR/_txlab_writer.lease               held (lease object) by the one writing sweep, object storage
    DIR/_quarantine/<name>.parquet        row files that did not read, set aside by a writer
    DIR/_tmp-<hex>                        a local writer's temporary file, renamed into place

Names starting with `_` or `.` are not rows: every Parquet reader skips them.
"""

from __future__ import annotations

from dataclasses import dataclass

MARKER = "_txlab_store.json"
LOCK = "_txlab_writer.lock"
LEASE = "_txlab_writer.lease"
QUARANTINE = "_quarantine"
TMP_PREFIX = "_tmp-"
FORMAT = "txlab-store"


@dataclass
class RowFile:
    path: str
    trial_key: str
    time_ns: int


def parse_name(path: str) -> RowFile | None:
    """The row file at `path` (`<trial_key>.<time_ns>.parquet`), or None for any other name."""
    name = basename(path)
    if name.startswith(("_", ".")) or not name.endswith(".parquet"):
        return None
    parts = name[: -len(".parquet")].split(".")
    if len(parts) != 2 or not parts[1].isdigit():
        return None
    return RowFile(path, parts[0], int(parts[1]))


def row_file_name(trial_key: str, time_ns: int) -> str:
    return f"{trial_key}.{time_ns}.parquet"


def basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]
