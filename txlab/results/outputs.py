"""Outputs stay out of stores: a store directory holds rows only, since pandas.read_parquet and
pyarrow.dataset read every file under it (`txlab plot --out plots/NAME`, never inside the store)."""

from __future__ import annotations

from pathlib import Path

from txlab.results.errors import StoreError
from txlab.results.layout import MARKER


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
