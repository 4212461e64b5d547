"""Synthetic tokens: uniform random ids, seeded; the one synthetic source of trials and `txlab train`."""

from __future__ import annotations

import torch

from txlab.data.batch import Batch, Indexed


class Synthetic(Indexed):
    """Uniform random tokens, (batch_size, seq_len + 1) a batch.

    Batch g (g >= 0) is the g-th draw of one generator seeded with `seed`: a trial reading batches
    0, 1, 2, ... gets the stream every txlab release has measured on (so stored losses reproduce). The
    generator is kept between calls, so reading in order costs one draw a batch; a jump back (a
    resumed run) restarts the stream and a jump forward (a data-loader worker's stride) skips draws.
    Held-out batches (g < 0) come from a generator of their own per batch.
    """

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, seed: int):
        self.vocab_size, self.seq_len, self.batch_size, self.seed = vocab_size, seq_len, batch_size, seed
        self._gen: torch.Generator | None = None
        self._next = 0  # index of the batch the generator draws next

    def _draw(self, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=gen)

    def batch(self, g: int) -> Batch:
        if g < 0:
            return Batch(self._draw(torch.Generator().manual_seed(self.seed * 1_000_003 + g)), None, g)
        if self._gen is None or g < self._next:
            self._gen, self._next = torch.Generator().manual_seed(self.seed), 0
        while self._next < g:
            self._draw(self._gen)
            self._next += 1
        self._next += 1
        return Batch(self._draw(self._gen), None, g)

    def eval_batches(self, n: int) -> list[Batch]:
        return [self.batch(-1 - i) for i in range(n)]
