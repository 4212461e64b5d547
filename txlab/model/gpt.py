"""A GPT-style decoder as a pure nn.Module (nanoGPT's shape, with the knobs of the model config).

No training machinery lives here: attention kernels, recomputation and the loss are applied from
outside (`txlab.policy.apply`). `forward` returns the final hidden states; `lm_head` maps them to logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from txlab.config import ModelConfig
from txlab.model.attention import AttentionFn, sdpa_attention


def make_norm(kind: str, width: int, eps: float) -> nn.Module:
    match kind:
        case "layernorm":
            return nn.LayerNorm(width, eps=eps)
        case "rmsnorm":
            return nn.RMSNorm(width, eps=eps)
        case _:
            raise ValueError(f"unknown norm {kind!r}; known: layernorm, rmsnorm")


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Angular frequency of each rotated pair, (head_dim / 2,): base^(-2i / head_dim), and under
    `rope_scaling: llama3` Llama 3.1's stretch of the long wavelengths (Meta's reference code): wavelengths
    longer than rope_original_len / low_freq_factor are divided by rope_factor, shorter than
    rope_original_len / high_freq_factor kept, and the band between interpolated smoothly."""
    D = cfg.attn_head_dim()
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    match cfg.rope_scaling:
        case "none":
            return inv_freq
        case "llama3":
            wavelen = 2 * math.pi / inv_freq
            low_wavelen = cfg.rope_original_len / cfg.rope_low_freq_factor
            high_wavelen = cfg.rope_original_len / cfg.rope_high_freq_factor
            scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
            smooth = (cfg.rope_original_len / wavelen - cfg.rope_low_freq_factor) / (
                cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return torch.where(medium, smoothed, scaled)
        case _:
            raise ValueError(f"unknown rope scaling {cfg.rope_scaling!r}; known: none, llama3")


def rope_tables(cfg: ModelConfig, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, (seq_len, head_dim / 2) each."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), rope_frequencies(cfg))  # (T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (B, H, T, D) by position-dependent angles."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.attn_head_dim()
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * self.head_dim, bias=cfg.attn_bias)
        self.proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=cfg.attn_out_bias)
        # Qwen3: each head's q and k normalized over head_dim before RoPE
        self.q_norm = make_norm("rmsnorm", self.head_dim, cfg.eps()) if cfg.qk_norm else None
        self.k_norm = make_norm("rmsnorm", self.head_dim, cfg.eps()) if cfg.qk_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        # A plain attribute, not a submodule: the kernel is a policy, swapped in by txlab.policy.
        self.attn_fn: AttentionFn = sdpa_attention

    def heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """(B, T, n * head_dim) -> (B, n, T, head_dim)."""
        B, T, _ = t.shape
        return t.view(B, T, n, self.head_dim).transpose(1, 2)

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, H, T, D), k and v (B, Hkv, T, D); `rope`: the cos/sin rows of x's positions."""
        kv = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        q, k, v = self.heads(q, self.n_heads), self.heads(k, self.n_kv_heads), self.heads(v, self.n_kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """Attention output y (B, H, T, D) -> the residual branch (B, T, C)."""
        B, H, T, D = y.shape
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, H * D)))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        return self.output(self.attn_fn(*self.project(x, rope)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        d = cfg.d_model
        if cfg.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"unknown mlp {cfg.mlp!r}; known: gelu, swiglu")
        hidden = cfg.mlp_width()  # shared with the int4 group check
        # swiglu: gate and up projections in one matmul
        self.fc = nn.Linear(d, 2 * hidden if cfg.mlp == "swiglu" else hidden, bias=cfg.mlp_bias)
        self.proj = nn.Linear(hidden, d, bias=cfg.mlp_bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.drop(self.proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.eps())
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.eps())
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)  # the branch is freed by the add (autograd keeps no copy)
        return self.mlp_residual(x)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The second half of the block: the MLP branch added to the residual stream. Shared with the
        decode engine (txlab.model.decode), which computes the attention half its own way."""
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_positions or seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.eps())
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        if cfg.pos == "rope":
            cos, sin = rope_tables(cfg, seq_len)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers) so the residual stream's variance
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, idx: torch.Tensor, pos0: int = 0) -> torch.Tensor:
        """idx (B, T) at positions pos0.. -> the residual stream's input (B, T, d_model)."""
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(pos0, pos0 + idx.shape[1], device=idx.device))
        return self.drop(x)

    def rope_at(self, pos0: int, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary cos/sin rows of positions pos0 .. pos0 + n - 1 (None for learned positions)."""
        if self.wpe is not None:
            return None
        return self.rope_cos[pos0 : pos0 + n], self.rope_sin[pos0 : pos0 + n]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> final hidden states (B, T, d_model)."""
        x = self.embed(idx)
        rope = self.rope_at(0, idx.shape[1])
        for block in self.blocks:
            x = block(x, rope)
        return self.norm_f(x)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> next-token logits (B, T, vocab)."""
        return F.linear(self(idx), self.lm_head.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_non_embedding_params(self) -> int:
        """Parameters that cost FLOPs per token (nanoGPT's convention: position table excluded)."""
        n = self.num_params()
        return n - (self.wpe.weight.numel() if self.wpe is not None else 0)
