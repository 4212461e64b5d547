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
from txlab.model.moe import MoE


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
    D = cfg.rope_dim()
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
        case "yarn":
            return _yarn_frequencies(cfg, inv_freq)
        case _:
            raise ValueError(f"unknown rope scaling {cfg.rope_scaling!r}; known: none, llama3, yarn")


def _yarn_frequencies(cfg: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """YaRN (Peng et al. 2023, as transformers computes it): dimensions that turn more than beta_fast times over
    the original context keep their frequency, those turning fewer than beta_slow times are divided by
    rope_factor, and a linear ramp blends the band between (its bounds rounded outwards)."""
    D, base, orig = cfg.rope_dim(), cfg.rope_theta, cfg.rope_original_len

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
        return D * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_of(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(dim_of(cfg.rope_beta_slow)), D - 1)
    ramp = ((torch.arange(D // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    keep = 1 - ramp  # the share of each dimension left extrapolated (unscaled)
    return inv_freq / cfg.rope_factor * (1 - keep) + inv_freq * keep


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 m ln(factor) + 1 (1 when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_magnitude(cfg: ModelConfig) -> float:
    """What cos and sin are multiplied by: 1, or under yarn mscale(factor, mscale) / mscale(factor,
    mscale_all_dim) when the config gives both, else mscale(factor) (transformers' attention_factor)."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return yarn_mscale(cfg.rope_factor, cfg.rope_mscale) / yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
    return yarn_mscale(cfg.rope_factor)


def rope_tables(cfg: ModelConfig, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, (seq_len, rope_dim / 2) each (times rope_magnitude)."""
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), rope_frequencies(cfg))  # (T, rope_dim/2)
    magnitude = rope_magnitude(cfg)
    if magnitude == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * magnitude, angles.sin() * magnitude


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
        # q and k normalized before RoPE: each head over head_dim (Qwen3), or each whole projection before the
        # split into heads (OLMoE: qk_norm_scope projection)
        self.norm_heads = cfg.qk_norm_scope == "head"
        q_width, k_width = (self.head_dim, self.head_dim) if self.norm_heads else (cfg.n_heads * self.head_dim,
                                                                                  cfg.n_kv_heads * self.head_dim)  # fmt: skip
        self.q_norm = make_norm("rmsnorm", q_width, cfg.eps()) if cfg.qk_norm else None
        self.k_norm = make_norm("rmsnorm", k_width, cfg.eps()) if cfg.qk_norm else None
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
        if self.q_norm is not None and not self.norm_heads:
            q = self.q_norm(q)
        q = self.heads(q, self.n_heads)
        if self.q_norm is not None and self.norm_heads:
            q = self.q_norm(q)
        if rope is not None:
            q = apply_rope(q, *rope)
        return q, self.keys(k, rope), self.heads(v, self.n_kv_heads)

    def keys(self, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The key projection's output (B, T, n_kv_heads * head_dim) -> keys (B, Hkv, T, D): normalized
        (qk_norm), split into heads and rotated. Shared with the decode engine's recomputed keys."""
        if self.k_norm is not None and not self.norm_heads:
            k = self.k_norm(k)
        k = self.heads(k, self.n_kv_heads)
        if self.k_norm is not None and self.norm_heads:
            k = self.k_norm(k)
        return apply_rope(k, *rope) if rope is not None else k

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """Attention output y (B, H, T, D) -> the residual branch (B, T, C)."""
        B, H, T, D = y.shape
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, H * D)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention kernel (set by the policy) on projected q, k, v."""
        return self.attn_fn(q, k, v)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        return self.output(self.attend(*self.project(x, rope)))


class LatentAttention(Attention):
    """DeepSeek's multi-head latent attention (MLA, DeepSeek-V2/V3), the `attn: mla` variant of `Attention`.

    Queries come through a rank-`mla_q_rank` bottleneck (or one projection). Keys and values come from a small
    per-token latent: d_model -> mla_kv_rank (RMSNorm) -> every head's key part without position (nope) and
    its value; a separate mla_rope_dim part of the key, rotated by RoPE, is one per token and shared by all
    heads. Each head's query is [nope | rope] like its key. `project` expands the latent into ordinary
    (B, H, T, D) keys and values, so every attention kernel and policy applies unchanged. Values are
    mla_v_dim wide, keys mla_nope_dim + mla_rope_dim: `attend` pads the values with zeros to the keys' width
    for the kernel and drops the padding from its output (the same numbers), because fused kernels that need
    one width (CPU's flash kernel, FlashAttention) would otherwise fall back to materializing T x T scores,
    and the chunked kernel takes one width too. The decode engine caches the latent instead (`latent` and
    `expand`): mla_kv_rank + mla_rope_dim numbers a token and layer.
    """

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        d, H = cfg.d_model, cfg.n_heads
        self.n_heads = self.n_kv_heads = H
        self.nope_dim, self.rope_dim, self.v_head_dim = cfg.mla_nope_dim, cfg.mla_rope_dim, cfg.mla_v_dim
        self.head_dim = self.nope_dim + self.rope_dim
        self.kv_rank = cfg.mla_kv_rank
        if cfg.mla_q_rank is not None:  # transformers' q_a_proj, q_a_layernorm (eps 1e-6), q_b_proj
            self.q_down = nn.Linear(d, cfg.mla_q_rank, bias=cfg.attn_bias)
            self.q_norm = nn.RMSNorm(cfg.mla_q_rank, eps=1e-6)
            self.q_up = nn.Linear(cfg.mla_q_rank, H * self.head_dim, bias=False)
        else:
            self.q = nn.Linear(d, H * self.head_dim, bias=False)
        # kv_a_proj_with_mqa: the latent and the shared rotated key part; kv_a_layernorm (eps 1e-6); kv_b_proj
        self.kv_down = nn.Linear(d, self.kv_rank + self.rope_dim, bias=cfg.attn_bias)
        self.kv_norm = nn.RMSNorm(self.kv_rank, eps=1e-6)
        self.kv_up = nn.Linear(self.kv_rank, H * (self.nope_dim + self.v_head_dim), bias=False)
        self.proj = nn.Linear(H * self.v_head_dim, d, bias=cfg.attn_out_bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.attn_fn: AttentionFn = sdpa_attention
        # YaRN scales the softmax of every q/k dimension by mscale(factor, mscale_all_dim)^2 (DeepSeek's reference
        # code; transformers' yarn_apply_mscale); the kernels scale by 1/sqrt(D), so q carries the factor
        m = yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) if cfg.rope_scaling == "yarn" else 1.0
        self.q_scale = m * m if cfg.rope_mscale_all_dim else 1.0

    def queries(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x (B, T, C) -> q (B, H, T, nope + rope), the rope part rotated."""
        q = self.q_up(self.q_norm(self.q_down(x))) if hasattr(self, "q_up") else self.q(x)
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, nope + rope)
        if rope is not None:
            q_nope, q_rot = q.split([self.nope_dim, self.rope_dim], dim=-1)
            q = torch.cat([q_nope, apply_rope(q_rot, *rope)], dim=-1)
        return q * self.q_scale if self.q_scale != 1.0 else q

    def latent(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> the latent (B, T, kv_rank), normalized, and the rotated key part (B, 1, T, rope)."""
        B, T, _ = x.shape
        c, k_rot = self.kv_down(x).split([self.kv_rank, self.rope_dim], dim=-1)
        k_rot = k_rot.view(B, 1, T, self.rope_dim)
        return self.kv_norm(c), apply_rope(k_rot, *rope) if rope is not None else k_rot

    def expand(self, c: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent (B, T, kv_rank) and key part (B, 1, T, rope) -> k (B, H, T, nope + rope), v (B, H, T, v)."""
        B, T, _ = c.shape
        kv = self.kv_up(c).view(B, T, self.n_heads, self.nope_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(B, self.n_heads, T, self.rope_dim)], dim=-1)
        return k, v

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q, k (B, H, T, nope + rope) and v (B, H, T, v_dim)."""
        return self.queries(x, rope), *self.expand(*self.latent(x, rope))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The kernel on q, k (B, H, T, nope + rope) and v (B, H, T, v_dim) padded to the q/k width -> (B, H, T,
        v_dim)."""
        pad = self.head_dim - self.v_head_dim
        if pad <= 0:
            return self.attn_fn(q, k, v)
        return self.attn_fn(q, k, F.pad(v, (0, pad)))[..., : self.v_head_dim]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # a mixture-of-experts model's dense layers are SwiGLU (its first layers, Qwen's mlp_only_layers)
        self.kind = "swiglu" if cfg.mlp == "moe" else cfg.mlp
        d = cfg.d_model
        if self.kind not in ("gelu", "swiglu"):
            raise ValueError(f"unknown mlp {cfg.mlp!r}; known: gelu, swiglu, moe")
        hidden = cfg.mlp_width()  # shared with the int4 group check
        # swiglu: gate and up projections in one matmul
        self.fc = nn.Linear(d, 2 * hidden if self.kind == "swiglu" else hidden, bias=cfg.mlp_bias)
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


def make_attention(cfg: ModelConfig) -> Attention:
    match cfg.attn:
        case "mha":
            return Attention(cfg)
        case "mla":
            return LatentAttention(cfg)
        case _:
            raise ValueError(f"unknown attention {cfg.attn!r}; known: mha, mla")


def make_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    """Layer `layer`'s MLP: the mixture of experts where cfg.moe_layer(layer), else the dense one."""
    if not cfg.moe_layer(layer):
        return MLP(cfg)
    return MoE(
        cfg.d_model, cfg.moe_experts, cfg.moe_top_k, cfg.expert_width(), cfg.moe_shared, cfg.moe_router,
        cfg.moe_renorm, cfg.moe_groups, cfg.moe_topk_groups, cfg.moe_scale, cfg.dropout,
    )  # fmt: skip


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.eps())
        self.attn = make_attention(cfg)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.eps())
        self.mlp = make_mlp(cfg, layer)

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
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
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

    def num_active_params(self) -> int:
        """Parameters one token uses: all of them but the routed experts it is not sent to (a dense model: all)."""
        return self.num_params() - self.num_inactive_params()

    def num_inactive_params(self) -> int:
        """Parameters a token leaves unused: the routed experts of each MoE layer it is not sent to (E - k)."""
        return sum(m.inactive_params() for m in self.modules() if isinstance(m, MoE))

    def num_non_embedding_params(self) -> int:
        """Parameters that cost FLOPs per token (nanoGPT's convention: position table excluded)."""
        n = self.num_params()
        return n - (self.wpe.weight.numel() if self.wpe is not None else 0)
