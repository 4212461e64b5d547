"""Units every part of txlab shares: one definition each."""

from __future__ import annotations

GiB = 2**30  # bytes; every GiB in txlab (configs, rows, plots, messages) is 2^30 bytes
