"""Where a store lives: a local directory or object storage, through pyarrow's filesystems.

A location is a local path, or a URI pyarrow's filesystems understand (`file:///abs/dir`, `s3://bucket/dir`,
`gs://bucket/dir`, ...), else one fsspec understands (`memory://dir`, ...). Writing a whole file is atomic
on both: on local disk through a temporary file and a rename, on object storage because an object appears
whole when its single upload completes (so no temporary is used there, and a copy-based "rename" would
only double the traffic).
"""

from __future__ import annotations

import os
import time
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

from txlab.results.errors import StoreError
from txlab.results.layout import TMP_PREFIX, basename

STALE_TMP_S = 600.0  # temporaries older than this are leftovers of a killed writer


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path in it of a store location (module docstring)."""
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


def atomic_write(fs: pafs.FileSystem, root: str, path: str, data: bytes, local: bool) -> None:
    """Write `data` to `path` whole or not at all: one upload on object storage, a temporary file in `root`
    renamed into place on local disk (removed again if anything fails)."""
    if not local:
        # Object stores publish an object whole when its upload completes: one write is atomic,
        # and a copy-based "rename" would only double the traffic.
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{root}/{TMP_PREFIX}{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def remove_stale_temporaries(fs: pafs.FileSystem, root: str) -> None:
    """Delete the temporaries in `root` older than STALE_TMP_S: a killed writer's (a live one's are newer)."""
    sel = pafs.FileSelector(root, allow_not_found=True, recursive=False)
    now = time.time()
    for info in fs.get_file_info(sel):
        name = basename(info.path)
        if info.type == pafs.FileType.File and name.startswith(TMP_PREFIX):
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            if now - mtime > STALE_TMP_S:
                try:
                    fs.delete_file(info.path)
                except OSError:
                    pass
