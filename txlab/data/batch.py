"""A batch of tokens, the indexed-source contract every split follows, and the (x, y) stream a
measured trial consumes (real text or synthetic tokens alike)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T+1) int64: inputs tokens[:, :-1], targets tokens[:, 1:]
    nbytes: int | None  # UTF-8 bytes the targets cover; None for synthetic data
    index: int  # global batch index

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tokens.to(device, non_blocking=True)  # one transfer; inputs and targets are views of it
        return t[:, :-1], t[:, 1:]


class Indexed:
    """Sources whose batch g is a pure function of (seed, g): worker `rank` of `world` takes g = rank,
    rank + world, ... so shards never overlap and a checkpoint needs only g."""

    def batch(self, g: int) -> Batch:
        raise NotImplementedError

    def iter_batches(self, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        g = start + rank
        while True:
            yield self.batch(g)
            g += world


class TrialBatches:
    """The batches of a measured trial: `next()` -> (x, y) on the device, from a split's batches 0, 1, ...;
    the bytes the last batch's targets cover in `last_bytes` (None for synthetic tokens).

    Rank `rank` of `world` (a sharded trial) takes rows rank * B/world .. (rank + 1) * B/world of each
    global batch of B rows, so the ranks together see exactly the batch a one-device trial sees. Its
    `last_bytes` is None: the split counts bytes per batch, not per row.
    """

    def __init__(self, split: Indexed, device: torch.device, rank: int = 0, world: int = 1):
        self.it, self.device, self.rank, self.world = split.iter_batches(0), device, rank, world
        self.last_bytes: int | None = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = next(self.it)
        if self.world == 1:
            self.last_bytes = b.nbytes
            return b.to(self.device)
        share = b.tokens.shape[0] // self.world
        rows = Batch(b.tokens[self.rank * share : (self.rank + 1) * share], None, b.index)
        return rows.to(self.device)
