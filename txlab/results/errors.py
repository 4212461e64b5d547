"""What the store says when something is wrong: its errors (bad input, exit 2) and its warnings (one line
on stderr, once per process per message)."""

from __future__ import annotations

import sys

from txlab.config import ConfigError


class StoreError(ConfigError):
    """A store path or its content that cannot be used: bad input, exit 2."""


class StoreLocked(StoreError):
    """Another process holds the store's writer lock."""


_warned: set[str] = set()


def warn(message: str) -> None:
    """One `warning:` line on stderr, once per process per message."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)
