"""Weight-only int4 quantization of the attention and MLP projections (`model.quant: int4`), inference only.

Each projection weight W (out, in) is cut along `in` into groups of `model.quant_group` values; each
group gets one scale s = max|w| / 7 (stored fp16) and its values become integers q = round(w / s)
clamped to [-8, 7], stored two per byte (low nibble: even column, high nibble: odd column, both
offset by +8). The matmul dequantizes on the fly: W' = q * s, then x @ W'^T + b. Only W' of the one
layer being run exists at a time; the packed bytes are what the model holds.

Applied from outside the model (like the attention kernel and recomputation): `quantize_model`
replaces `qkv`, `attn.proj`, `mlp.fc` and `mlp.proj` of every block with `Int4Linear`. Embeddings,
norms and the output head stay at full precision.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QMIN, QMAX = -8, 7  # signed 4-bit range
SCALE_DTYPE = torch.float16


def pack_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> packed (out, in/2) uint8 and scales (out, in/group) fp16.

    `in` must be a multiple of `group`, and `group` even (so a byte never straddles two groups).
    """
    out_f, in_f = w.shape
    if group % 2 or in_f % group:
        raise ValueError(f"int4 packing needs an even group dividing the input width ({in_f} % {group})")
    g = w.detach().float().reshape(out_f, in_f // group, group)  # (out, n_groups, group)
    scale = (g.abs().amax(dim=-1) / QMAX).to(SCALE_DTYPE)  # (out, n_groups)
    s = scale.float().unsqueeze(-1)
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group (or one under fp16's range) packs as zeros
    q = torch.clamp(torch.round(g / s), QMIN, QMAX).to(torch.int16) - QMIN  # 0..15
    q = q.reshape(out_f, in_f).to(torch.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # (out, in/2): two values per byte
    return packed.contiguous(), scale.contiguous()


def unpack_int4(
    packed: torch.Tensor, scale: torch.Tensor, group: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `pack_int4` up to rounding: (out, in) in `dtype`."""
    out_f, half = packed.shape
    low = (packed & 0x0F).to(torch.int8) + QMIN
    high = (packed >> 4).to(torch.int8) + QMIN
    q = torch.stack((low, high), dim=-1).reshape(out_f, 2 * half)  # interleave back: even, odd columns
    w = q.reshape(out_f, -1, group).to(dtype) * scale.to(dtype).unsqueeze(-1)
    return w.reshape(out_f, 2 * half)


class Int4Linear(nn.Module):
    """A Linear whose weight is held as packed int4 + fp16 group scales and dequantized per call.

    The packed bytes and scales are buffers (an integer tensor cannot be a parameter that takes
    gradients, which torch's memory tracker hooks on every parameter); `quantized_bytes` counts them
    so a trial can report them with the parameters. The bias stays at full precision.
    """

    def __init__(self, linear: nn.Linear, group: int):
        super().__init__()
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        packed, scale = pack_int4(linear.weight, group)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.bias = (
            None
            if linear.bias is None
            else nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        )

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        return unpack_int4(self.packed, self.scale, self.group, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return F.linear(x.to(dtype), self.weight(dtype), None if self.bias is None else self.bias.to(dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, int4"


def projection_names(model: nn.Module) -> list[str]:
    """Qualified names of the projections int4 applies to: qkv, attn.proj, mlp.fc, mlp.proj per block."""
    names = []
    for i, _ in enumerate(model.blocks):
        names += [f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc", f"blocks.{i}.mlp.proj"]
    return names


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the packed int4 weights and their scales (buffers of the Int4Linear modules)."""
    return sum(
        m.packed.numel() * m.packed.element_size() + m.scale.numel() * m.scale.element_size()
        for m in model.modules()
        if isinstance(m, Int4Linear)
    )


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held: every parameter (shared tensors once) + packed int4 weights."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total + quantized_bytes(model)


def quantize_model(model: nn.Module, group: int) -> nn.Module:
    """Replace the block projections of `model` with Int4Linear, in place; returns the model."""
    for name in projection_names(model):
        parent_name, leaf = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, Int4Linear(getattr(parent, leaf), group))
    return model
