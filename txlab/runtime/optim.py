"""AdamW as trials and `txlab train` build it."""

from __future__ import annotations

import torch


def make_adamw(
    model: torch.nn.Module,
    device: torch.device,
    lr: float = 3e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.1,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """AdamW for trials and `txlab train` alike; fused (one kernel, no per-parameter temporaries) on CUDA
    unless `fused` says otherwise.

    Weight decay on every matrix (parameters of 2 or more dimensions), embeddings included; none on
    norms and biases (GPT-2's and nanoGPT's rule). Embeddings decay because with tied weights (the
    default) the token embedding is also the output projection, a matrix that every position's logits
    train at every step; and because trials have always built AdamW this way, so stored figures (the
    optimizer's temporaries are grouped by decay) reproduce.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]  # each parameter once: a tied lm_head is wte
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda" if fused is None else fused)
