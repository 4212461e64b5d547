"""What rules candidates out in arithmetic, before any estimate: the per-device floor of the training state.

At the AdamW step every parameter's fp32 weight (the master copy under bf16 autocast), its fp32 gradient and
AdamW's two fp32 moments are live: 16 bytes a parameter. However a layout splits them, no device holds less
than 1/N of them, so 16 P / N bytes is a floor on any candidate's peak on N devices (a floor, not an estimate:
activations, gathered parameters and buffers come on top). A floor over the capacity rules out every layout of
N devices at once, and says how many devices the state alone needs.
"""

from __future__ import annotations

import math

import torch

from txlab.config import TrialConfig

STATE_BYTES_PER_PARAM = 16  # fp32 weight 4 + fp32 gradient 4 + AdamW exp_avg 4 + exp_avg_sq 4


def count_params(cfg: TrialConfig) -> int:
    """The model's parameters, counted on the meta device (shapes only: no memory, a second for 70B)."""
    from txlab.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg.model, cfg.workload.seq_len)
    return model.num_params()


def state_floor_bytes(n_params: int, devices: int) -> int:
    """The least any device holds at the AdamW step: weights, gradients and AdamW state over `devices`."""
    return math.ceil(STATE_BYTES_PER_PARAM * n_params / devices)


def devices_needed(n_params: int, capacity_bytes: int) -> int:
    """The fewest devices whose share of the training state fits `capacity_bytes` (a floor on the answer)."""
    return math.ceil(STATE_BYTES_PER_PARAM * n_params / capacity_bytes)
