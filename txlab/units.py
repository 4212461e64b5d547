"""Units every part of txlab shares: one definition each."""

from __future__ import annotations

GiB = 2**30  # bytes; every GiB in txlab (configs, rows, plots, messages) is 2^30 bytes


def gib_to_bytes(gib: float | None) -> int | None:
    """A GiB figure (a budget, a capacity) in bytes; None stays None."""
    return None if gib is None else int(gib * GiB)
