"""Synthetic tokens: uniform random ids, seeded, the one synthetic source of trials and training."""

from __future__ import annotations

import torch


class SyntheticBatches:
    """Uniform random tokens, seeded; inputs and next-token targets of shape (B, T)."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int, device: torch.device):
        self.gen = torch.Generator().manual_seed(seed)
        self.shape = (batch_size, seq_len + 1)
        self.vocab_size, self.device = vocab_size, device

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, self.vocab_size, self.shape, generator=self.gen).to(self.device)
        return tokens[:, :-1], tokens[:, 1:]
