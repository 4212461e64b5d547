"""Long-context inference: prefill and token-by-token decode under a KV policy (`kv`).

The engine knows models, not configs: it takes the narrow things a run needs (the KV policy's name, its
tile, the positions to hold, the batch, the dtype), resolved by its callers (`txlab.trial.infer`
from a trial's config, `txlab.train.generate` from a checkpoint's).

The engine drives the model's own modules: each block's `attn.project` (the QKV projection, head split
and RoPE of `txlab.model.gpt`), its attention kernel (set by `txlab.policy.apply.apply_policy`) for the
prefill, and `Attention.output` and `Block.mlp_residual` (output projection, residuals, MLP) — so there is one forward path to keep
in sync. What it adds is what decoding needs: absolute positions, and whatever the KV policy keeps
between steps:

- `cache`: the keys and values of every layer, (B, n_kv_heads, T_max, head_dim) each, allocated once
  for the whole run (T_max = the prompt, + the generated tokens), so the cache is never copied.
- `grouped`: the same cache on a grouped-query model (n_kv_heads < n_heads): it shrinks by the ratio.
- `recompute`: no keys or values outlive one layer of one step. What is kept is each layer's
  attention input (the normalized residual stream, (B, T_max, d_model) per layer); a decode step
  recomputes the keys and values of every past position from it, k_chunk positions at a time, and
  folds each tile into an online softmax (space-time trade-off attention: the cost of a generated
  token grows with the context, the memory is one tile).

Latent attention (`attn: mla`, DeepSeek-V3) keeps under `cache` what the model makes keys and values from:
each layer's normalized latent (B, T_max, mla_kv_rank) and the rotated key part shared by the heads
(B, 1, T_max, mla_rope_dim), and expands the past into keys and values at every step (transformers 5 caches
the same), so the cache holds mla_kv_rank + mla_rope_dim numbers a token and layer instead of
n_heads x (q/k width + value width). `recompute` is not built for it (the config refuses it).

Every policy computes the same logits as `cache` (fp32 tolerance), which the tests hold them to, greedy
generations included.

`generate_tokens` is the one generation loop (decode trials, `txlab generate`, the tests' greedy runs):
prefill once, then one `step` per token, each token chosen from the logits by a `pick` function (argmax,
or `txlab generate`'s sampler).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from txlab.model.gpt import GPT, LatentAttention, apply_rope
from txlab.model.quant import Int4Linear, unpack_int4

KV_POLICIES = ("cache", "grouped", "recompute")


def kv_cache_analytic_bytes(
    n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, elem_bytes: int, batch: int = 1
) -> int:
    """2 (K and V) * L * n_kv_heads * head_dim * T * bytes (* batch)."""
    return 2 * n_layers * n_kv_heads * head_dim * tokens * elem_bytes * batch


def _kv_weight(qkv: nn.Module, start: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows `start:` (the K and V projections) of a block's qkv weight and bias, in `dtype`."""
    if isinstance(qkv, Int4Linear):  # dequantize only the K/V rows
        w = unpack_int4(qkv.packed[start:], qkv.scale[start:], qkv.group, dtype)
    else:
        w = qkv.weight[start:].to(dtype)
    b = None if qkv.bias is None else qkv.bias[start:].to(dtype)
    return w, b


@dataclass
class Inference:
    """One generation's state: the model, the KV policy, and what the policy keeps between steps."""

    model: GPT
    max_len: int  # positions the run may reach (prompt + generated)
    batch_size: int
    kv: str = "cache"  # KV policy: cache, grouped (the cache of a grouped-query model) or recompute
    k_chunk: int = 512  # recompute: positions of K/V recomputed at a time (the tile); unused by the cache
    dtype: torch.dtype = torch.float32  # of the kept K/V (or layer inputs): the projections' output dtype
    pos: int = 0  # tokens consumed so far
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        m = self.model
        attn0 = m.blocks[0].attn
        self.n_heads, self.n_kv_heads, self.head_dim = attn0.n_heads, attn0.n_kv_heads, attn0.head_dim
        self.latent = isinstance(attn0, LatentAttention)
        self.d_model = m.cfg.d_model
        self.device = m.wte.weight.device
        B, T, Hkv, D = self.batch_size, self.max_len, self.n_kv_heads, self.head_dim
        # Allocated up front, for the whole run: the cache never grows by copying.
        if self.max_len < 1:
            raise ValueError(f"max_len: a run holds at least one position, got {self.max_len}")
        if self.latent:  # keys: the latents (B, T, rank); values: the rotated key parts (B, 1, T, rope)
            if self.kv != "cache":
                raise ValueError(f"kv policy {self.kv!r} is not built for latent attention; use cache")
            self.keys = [torch.empty(B, T, attn0.kv_rank, dtype=self.dtype, device=self.device) for _ in m.blocks]
            self.values = [torch.empty(B, 1, T, attn0.rope_dim, dtype=self.dtype, device=self.device) for _ in m.blocks]
        elif self.kv in ("cache", "grouped"):
            self.keys = [torch.empty(B, Hkv, T, D, dtype=self.dtype, device=self.device) for _ in m.blocks]
            self.values = [torch.empty(B, Hkv, T, D, dtype=self.dtype, device=self.device) for _ in m.blocks]
        elif self.kv == "recompute":
            if self.k_chunk < 1:
                raise ValueError(f"k_chunk: the recompute tile holds at least one position, got {self.k_chunk}")
            self.inputs = [torch.empty(B, T, self.d_model, dtype=self.dtype, device=self.device) for _ in m.blocks]
        else:
            raise ValueError(f"unknown kv policy {self.kv!r}; known: {', '.join(KV_POLICIES)}")

    # --- what the policy keeps -------------------------------------------------------------------

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of keys and values held between steps (0 under recompute)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def kv_inputs_bytes(self) -> int:
        """Bytes of layer inputs held to recompute keys and values from (recompute only)."""
        return sum(t.numel() * t.element_size() for t in self.inputs)

    # --- prefill: the whole prompt at once -----------------------------------------------------------

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) from position 0 -> final hidden states (B, T, d_model); the policy's state is built."""
        B, T = idx.shape
        if T > self.max_len:
            raise ValueError(f"prompt of {T} tokens is longer than the run's {self.max_len} positions")
        rope = self.model.rope_at(0, T)
        x = self.model.embed(idx, 0)
        for layer, block in enumerate(self.model.blocks):
            h = block.norm1(x)
            if self.latent:
                x = block.mlp_residual(x + block.attn.output(self._attend_latent(block.attn, layer, h, rope, 0)))
                continue
            q, k, v = block.attn.project(h, rope)
            if self.inputs:
                self.inputs[layer][:, :T] = h
            else:
                self.keys[layer][:, :, :T] = k
                self.values[layer][:, :, :T] = v
            y = block.attn.attn_fn(q, k, v)  # (B, H, T, D), causal: the kernel the policy set
            del q, k, v, h
            x = block.mlp_residual(x + block.attn.output(y))
        self.pos = T
        return self.model.norm_f(x)

    # --- decode: one token per step ------------------------------------------------------------------

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at position `pos` -> final hidden state (B, d_model); the state grows by one position."""
        t = self.pos
        if t >= self.max_len:
            raise ValueError(f"the run holds {self.max_len} positions; all are used")
        idx = tokens.view(-1, 1)
        rope = self.model.rope_at(t, 1)
        x = self.model.embed(idx, t)  # (B, 1, d_model)
        for layer, block in enumerate(self.model.blocks):
            h = block.norm1(x)
            if self.latent:
                x = block.mlp_residual(x + block.attn.output(self._attend_latent(block.attn, layer, h, rope, t)))
                continue
            q, k, v = block.attn.project(h, rope)  # (B, H, 1, D), (B, Hkv, 1, D)
            if self.inputs:
                self.inputs[layer][:, t : t + 1] = h
                y = self._attend_recomputed(block, layer, q, k, v, t)
            else:
                self.keys[layer][:, :, t : t + 1] = k
                self.values[layer][:, :, t : t + 1] = v
                y = self._attend_cached(q, layer, t + 1)
            x = block.mlp_residual(x + block.attn.output(y))
        self.pos = t + 1
        return self.model.norm_f(x)[:, 0]

    def _attend_latent(self, attn: LatentAttention, layer: int, h: torch.Tensor, rope, t: int) -> torch.Tensor:
        """Latent attention of the new positions t.. of h (B, n, C): their latents and rotated key parts written
        to the cache, every cached position expanded into keys and values, attended causally."""
        n = h.shape[1]
        c, k_rot = attn.latent(h, rope)  # (B, n, rank), (B, 1, n, rope)
        self.keys[layer][:, t : t + n] = c
        self.values[layer][:, :, t : t + n] = k_rot
        k, v = attn.expand(self.keys[layer][:, : t + n], self.values[layer][:, :, : t + n])
        q = attn.queries(h, rope)
        if t == 0:
            return attn.attend(q, k, v)  # the prompt: the policy's kernel, causal
        if n == 1:
            return F.scaled_dot_product_attention(q, k, v)  # one query: every cached position is its past
        raise ValueError("latent attention decodes one token a step after the prompt")

    def _attend_cached(self, q: torch.Tensor, layer: int, n: int) -> torch.Tensor:
        """The new query against the first n cached positions (all in its past: no mask)."""
        k, v = self.keys[layer][:, :, :n], self.values[layer][:, :, :n]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=self.n_heads != self.n_kv_heads)

    def _attend_recomputed(
        self, block: nn.Module, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, t: int
    ) -> torch.Tensor:
        """The new query against positions 0..t, keys and values recomputed k_chunk positions at a time
        from the kept layer inputs (position t's own K/V are the ones just computed), folded into an
        online softmax: only one tile of K/V exists at any time."""
        B, H, _, D = q.shape
        Hkv, G = self.n_kv_heads, H // self.n_kv_heads
        scale = 1.0 / math.sqrt(D)
        qg = q.reshape(B, Hkv, G, 1, D)
        w, b = _kv_weight(block.attn.qkv, H * D, self.dtype)  # the kept inputs' dtype (bf16 under autocast)
        row_max = torch.full((B, Hkv, G, 1), float("-inf"), dtype=torch.float32, device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros(B, Hkv, G, 1, D, dtype=torch.float32, device=q.device)
        chunk = self.k_chunk
        for k0 in range(0, t + 1, chunk):
            k1 = min(k0 + chunk, t + 1)
            if k1 == t + 1:  # the tile ends at the new position: its K/V are already computed
                if k1 - 1 > k0:
                    kj, vj = self._recompute_kv(block, layer, w, b, k0, k1 - 1)
                    kj, vj = torch.cat([kj, k_new], dim=2), torch.cat([vj, v_new], dim=2)
                else:
                    kj, vj = k_new, v_new
            else:
                kj, vj = self._recompute_kv(block, layer, w, b, k0, k1)
            s = (qg @ kj.unsqueeze(2).transpose(-2, -1)).float() * scale  # (B, Hkv, G, 1, tk)
            new_max = torch.maximum(row_max, s.amax(dim=-1))
            p = torch.exp(s - new_max.unsqueeze(-1))
            correction = torch.exp(row_max - new_max)
            row_sum = row_sum * correction + p.sum(dim=-1)
            acc = acc * correction.unsqueeze(-1) + p.to(vj.dtype) @ vj.unsqueeze(2)
            row_max = new_max
            del kj, vj, s, p
        return (acc / row_sum.unsqueeze(-1)).to(q.dtype).reshape(B, H, 1, D)

    def _recompute_kv(
        self, block: nn.Module, layer: int, w: torch.Tensor, b: torch.Tensor | None, k0: int, k1: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions k0..k1-1, from the kept layer inputs and the K/V rows of the
        block's projection (the query rows are not needed), split into heads, normalized (qk_norm) and
        rotated as `Attention.project` does."""
        attn, kv_width = block.attn, self.n_kv_heads * self.head_dim
        h = self.inputs[layer][:, k0:k1]  # (B, tk, d_model)
        k, v = F.linear(h.to(w.dtype), w, b).split([kv_width, kv_width], dim=-1)  # (B, tk, Hkv * D) each
        k, v = attn.heads(k, self.n_kv_heads), attn.heads(v, self.n_kv_heads)  # (B, Hkv, tk, D)
        if attn.k_norm is not None:  # Qwen3: as Attention.project, each key head normalized before RoPE
            k = attn.k_norm(k)
        rope = self.model.rope_at(k0, k1 - k0)
        if rope is not None:
            k = apply_rope(k, *rope)
        return k, v

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d_model) -> logits (..., vocab), fp32."""
        return F.linear(hidden, self.model.lm_head.weight).float()


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) -> the most likely token of each row (B,)."""
    return logits.argmax(-1)


@torch.no_grad()
def generate_tokens(
    run: Inference,
    prompt: torch.Tensor,
    pick: Callable[[torch.Tensor], torch.Tensor] = greedy,
    slide: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The generation loop: prefill `prompt` (B, T) into `run`, then one `run.step` per token.

    Yields (logits (B, V) fp32, token (B,) = pick(logits)): first the token after the prompt, then, each
    time the caller asks for the next one, the token after that (the previous token fed as one step).
    Lazy: the caller stops it by not asking (an end-of-text token, a token budget), and no step is computed
    past the last token taken, so n tokens cost the prefill and n - 1 steps, and use T + n - 1 positions.

    When all `run.max_len` positions are used: `slide=False` raises (the step's ValueError); `slide=True`
    crops the context as a model of max_len positions sees a longer text: the last max_len tokens are
    prefilled again from position 0 for every further token (and a prompt longer than the run is cropped to
    its last max_len tokens). This reproduces a loop that reruns the model on `ids[-max_len:]` exactly, at
    that loop's cost (one prefill per token) once the window is full, and at one step per token before.
    Only `slide=True` keeps the token history it needs for that.
    """
    B = prompt.shape[0]
    history = [prompt] if slide else None
    x = prompt[:, -run.max_len :] if slide else prompt
    logits = run.logits(run.prefill(x)[:, -1])  # the prefill's hidden states are freed here
    while True:
        token = pick(logits)
        yield logits, token
        del logits  # before the next step: only what the caller kept stays alive
        if slide:
            history.append(token.view(B, 1))
            if run.pos == run.max_len:  # the window is full: crop the context and prefill it again
                window = torch.cat(history, dim=1)[:, -run.max_len :]  # (B, max_len)
                history = [window]
                logits = run.logits(run.prefill(window)[:, -1])
                continue
        logits = run.logits(run.step(token))


def generate_greedy(
    model: GPT,
    prompt: torch.Tensor,
    n_new: int,
    kv: str = "cache",
    k_chunk: int = 512,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[torch.Tensor], Inference]:
    """Prefill `prompt` (B, T), then `n_new` greedy steps: (tokens (B, n_new), logits of each step, state).

    Token i is the argmax of the logits after the prompt and tokens < i; `n_new` steps each feed one
    token, so the state ends holding T + n_new positions and the logits are n_new + 1 (the last one after
    the last token). `generate_tokens` with `greedy`, for n_new + 1 tokens.
    """
    run = Inference(model, prompt.shape[1] + n_new, prompt.shape[0], kv, k_chunk, dtype)
    out = list(itertools.islice(generate_tokens(run, prompt), n_new + 1))
    tokens = torch.stack([token for _, token in out[:n_new]], dim=1) if n_new else prompt[:, :0]
    return tokens, [logits for logits, _ in out], run
