"""Progress lines of a trial, on stderr (stdout carries the result)."""

from __future__ import annotations

import sys


def log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)
