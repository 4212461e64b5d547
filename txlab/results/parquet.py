"""Rows as Parquet: a row checked against the store schema and written as one file's bytes; row files
read as one dataset in today's schema (txlab.results.columns), whatever version wrote them: a column an
older row lacks reads as null, and a config key added since reads as its default."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from txlab.results.columns import STATUSES, added_defaults, row_schema


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


def row_file_bytes(row: dict[str, Any]) -> bytes:
    """One row as the bytes of its Parquet file (ValueError for a row outside the store schema)."""
    sink = pa.BufferOutputStream()
    pq.write_table(rows_to_table([row]), sink)
    return sink.getvalue().to_pybytes()


def dataset(fs: pafs.FileSystem, paths: list[str]) -> pads.Dataset:
    # Row files written by older versions may lack newer columns: read them into today's schema.
    return pads.dataset(paths, schema=row_schema(), format="parquet", filesystem=fs)


def fill_added_defaults(table: pa.Table) -> pa.Table:
    """Rows of an older schema read a later config key as null: give them the key's default, which is what
    they ran with, so that old and new rows of the same computation group together in analysis."""
    for name, value in added_defaults().items():
        i = table.schema.get_field_index(name)
        if i >= 0 and table.column(i).null_count:
            filled = pc.fill_null(table.column(i), pa.scalar(value, table.schema.field(i).type))
            table = table.set_column(i, name, filled)
    return table


def footer_schema_version(fs: pafs.FileSystem, path: str) -> int | None:
    """The row schema version a row file's footer records (0 when it records none), None when its footer
    does not read."""
    try:
        meta = pq.read_schema(path, filesystem=fs).metadata or {}
        return int(meta.get(b"txlab.schema_version", b"0"))
    except (pa.ArrowException, OSError, ValueError):
        return None
