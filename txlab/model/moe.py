"""The mixture-of-experts MLP: a router, routed SwiGLU experts computed as grouped matmuls, optional shared
experts (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3).

How a layer computes (one pass over all tokens, no Python loop over tokens or experts):

1. The router scores every expert for every token and keeps the top k: `softmax` (Mixtral, Qwen, OLMoE:
   softmax over the experts in fp32, then top-k, optionally renormalised) or `sigmoid` (DeepSeek-V3: a
   sigmoid per expert in fp32; a learned correction bias is added to choose, optionally within the best
   expert groups, while the unbiased scores weight the chosen experts, renormalised and scaled).
2. The N x k (token, expert) pairs are sorted by expert (a stable argsort, so shapes never depend on the
   routing), the tokens gathered in that order, and each expert's rows multiplied by its weights in one
   grouped matmul (`expert_mm`: rows offs[e-1]:offs[e] times expert e's matrix) for the gate/up projection
   and another for the down projection.
3. Each row is multiplied by its routing weight and added back to its token (index_add); shared experts,
   a plain SwiGLU every token passes through, are added on top.

`expert_mm` is a torch custom op (txlab::expert_mm, with its weight gradient txlab::expert_mm_wgrad): on
real tensors it runs torch's `_grouped_mm` where the kernel takes the operands (CPU fp32 and bf16, CUDA
bf16, row strides a multiple of 16 bytes) and otherwise one matmul per expert over its slice of rows (a
loop over the E experts, which reads the group sizes on the host; said here because it is the only
place one happens). As one op with its own fake implementation it also runs under fake tensors (the
estimator) whatever the dtype, where torch's `_grouped_mm` accepts only bf16; its FLOPs are registered with
torch's FlopCounterMode (2 M N K per call).

The router's statistics of the last forward are kept on the module for what reads them from outside:
`tokens_per_expert` (the load, detached, (E,)), and the fp32 router probabilities summed over the tokens
(softmax routers; detached, or with their graph when `record_aux` is set, for a loss to train with), which
`load_balancing_loss` combines over layers into the auxiliary loss of Mixtral, Qwen3-MoE and OLMoE (Switch
Transformer's, as transformers computes it). DeepSeek-V3 defines no such loss (it balances with the
correction bias). txlab trains on the language-model loss alone (as transformers does with every published
config: `output_router_logits` off); a trial reports the auxiliary loss and the load apart (`routing_stats`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

# --- the grouped matmul --------------------------------------------------------------------------------


def _grouped_kernel_takes(*operands: torch.Tensor) -> bool:
    """Whether torch's `_grouped_mm` takes these operands (as passed to it): CPU fp32/bf16 or CUDA bf16, every
    stride but the unit one and the start of each tensor a multiple of 16 bytes."""
    t0 = operands[0]
    if t0.device.type == "cpu":
        ok_dtype = t0.dtype in (torch.float32, torch.bfloat16)
    elif t0.device.type == "cuda":
        ok_dtype = t0.dtype == torch.bfloat16
    else:
        ok_dtype = False
    return ok_dtype and all(
        t.dtype == t0.dtype
        and t.data_ptr() % 16 == 0
        and all((s * t.element_size()) % 16 == 0 for s in t.stride() if s != 1)
        for t in operands
    )


def _group_bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0, *ends[:-1]], ends))


def _grouped(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor | None:
    """torch's grouped matmul where its kernel takes the operands, else None (the caller loops over experts).
    A CUDA device whose kernel is not built for its architecture refuses at the call: None too."""
    if not _grouped_kernel_takes(a, b):
        return None
    try:
        return torch._grouped_mm(a, b, offs=offs)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        if a.device.type == "cpu":
            raise
        return None


@torch.library.custom_op("txlab::expert_mm", mutates_args=())
def expert_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (M, K) rows sorted by expert, w (E, N, K) one (out, in) matrix per expert, offs (E,) int32 end row of
    each expert's rows -> (M, N): rows offs[e-1]:offs[e] of x times w[e]^T."""
    out = _grouped(x, w.transpose(-2, -1), offs)  # w as (E, K, N)
    if out is not None:
        return out
    out = x.new_zeros(x.shape[0], w.shape[1])
    for e, (a, b) in enumerate(_group_bounds(offs)):
        if b > a:
            out[a:b] = x[a:b] @ w[e].transpose(0, 1)
    return out


@expert_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("txlab::expert_mm_wgrad", mutates_args=())
def expert_mm_wgrad(g: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The weight gradient of expert_mm: g (M, N), x (M, K) -> (E, N, K), expert e's rows' g^T x."""
    out = _grouped(g.transpose(0, 1), x, offs)  # g as (N, M)
    if out is not None:
        return out
    out = x.new_zeros(n_experts, g.shape[1], x.shape[1])
    for e, (a, b) in enumerate(_group_bounds(offs)):
        if b > a:
            out[e] = g[a:b].transpose(0, 1) @ x[a:b]
    return out


@expert_mm_wgrad.register_fake
def _(g, x, offs, n_experts):
    return x.new_empty(n_experts, g.shape[1], x.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()
    gx = expert_mm(grad, w.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    gw = expert_mm_wgrad(grad, x, offs, w.shape[0]) if ctx.needs_input_grad[1] else None
    return gx, gw, None


expert_mm.register_autograd(_backward, setup_context=_setup_context)


def _register_flops() -> None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.txlab.expert_mm)
    def _expert_mm_flops(x_shape, w_shape, offs_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[1] * w_shape[1]

    @register_flop_formula(torch.ops.txlab.expert_mm_wgrad)
    def _expert_mm_wgrad_flops(g_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * g_shape[0] * g_shape[1] * x_shape[1]


_register_flops()


# --- the modules ---------------------------------------------------------------------------------------


class GroupedLinear(nn.Module):
    """E bias-free linear maps of one shape, stored (E, out, in) like transformers' fused experts."""

    def __init__(self, n: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d_out, d_in))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """x (M, in) sorted by expert, offs (E,) -> (M, out)."""
        return expert_mm(x, self.weight.to(x.dtype), offs)


class Experts(nn.Module):
    """E SwiGLU experts without biases: gate and up projections (E, 2 * hidden, d_model), gate rows first as in
    the dense MLP's `fc`, and down projections (E, d_model, hidden)."""

    def __init__(self, n: int, d_model: int, hidden: int):
        super().__init__()
        self.fc = GroupedLinear(n, d_model, 2 * hidden)
        self.proj = GroupedLinear(n, hidden, d_model)

    def forward(self, rows: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """rows (M, d_model) sorted by expert, offs (E,) -> (M, d_model), each row through its expert."""
        return swiglu_experts(rows, offs, self.fc.weight, self.proj.weight)


def swiglu_experts(rows: torch.Tensor, offs: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """rows (M, d_model) sorted by expert, offs (E,), w_fc (E, 2 hidden, d_model), w_proj (E, d_model, hidden)
    -> (M, d_model): each row through its expert's SwiGLU (the weights in the rows' dtype: autocast's)."""
    gate, up = expert_mm(rows, w_fc.to(rows.dtype), offs).chunk(2, dim=-1)  # (M, hidden) each
    return expert_mm(F.silu(gate) * up, w_proj.to(rows.dtype), offs)


class Router(nn.Module):
    """Scores, chooses and weights each token's experts (see the module docstring)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, kind: str, renorm: bool, groups: int,
                 topk_groups: int, scale: float):  # fmt: skip
        super().__init__()
        if kind not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown router {kind!r}; known: softmax, sigmoid")
        self.n_experts, self.top_k, self.kind, self.renorm = n_experts, top_k, kind, renorm
        self.groups, self.topk_groups, self.scale = groups, topk_groups, scale
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)
        # DeepSeek-V3's e_score_correction_bias: added to the scores to choose experts (not to weight them);
        # a buffer, not a parameter: it is updated by a balancing rule, not by gradients.
        self.register_buffer("correction", torch.zeros(n_experts) if kind == "sigmoid" else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> weights (N, k) fp32, experts (N, k) int64, probabilities or scores (N, E) fp32."""
        if self.kind == "softmax":
            scores = F.linear(x, self.weight).float().softmax(dim=-1)  # (N, E)
            choice = scores
        else:  # the router in fp32 whatever the autocast (transformers keeps the gate in fp32)
            with torch.autocast(x.device.type, enabled=False):
                scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
            choice = scores + self.correction
        if self.groups > 1:
            N = choice.shape[0]
            grouped = choice.view(N, self.groups, -1)  # (N, G, E / G)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
            keep = group_scores.topk(self.topk_groups, dim=-1, sorted=False).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # (N, G)
            choice = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(N, -1)
        experts = choice.topk(self.top_k, dim=-1, sorted=self.kind == "softmax").indices  # (N, k)
        weights = scores.gather(1, experts)
        if self.renorm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if self.kind == "sigmoid" else 0.0))
        if self.scale != 1.0:
            weights = weights * self.scale
        return weights, experts, scores


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP without biases (gate and up in one matmul): the shared experts."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 2 * hidden, bias=False)
        self.proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class MoE(nn.Module):
    """The mixture-of-experts MLP of one layer: router, E routed SwiGLU experts, optional shared experts."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, hidden: int, n_shared: int = 0,
                 router: str = "softmax", renorm: bool = True, groups: int = 1, topk_groups: int = 1,
                 scale: float = 1.0, dropout: float = 0.0):  # fmt: skip
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k {top_k} must be in 1..{n_experts} (the experts)")
        self.n_experts, self.top_k, self.hidden = n_experts, top_k, hidden
        self.router = Router(d_model, n_experts, top_k, router, renorm, groups, topk_groups, scale)
        self.experts = Experts(n_experts, d_model, hidden)
        self.shared = SwiGLU(d_model, n_shared * hidden) if n_shared else None
        self.drop = nn.Dropout(dropout)
        self.record_aux = False  # keep the router probabilities' sum with its graph (a loss to train with)
        self.tokens_per_expert: torch.Tensor | None = None  # (E,) of the last forward: (token, expert) pairs
        self.router_prob_sum: torch.Tensor | None = None  # (E,) fp32, softmax routers (graph when record_aux)
        self.n_tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat_x = x.reshape(B * T, C)  # (N, C)
        weights, experts, scores = self.router(flat_x)  # (N, k), (N, k), (N, E)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        flat = experts.reshape(-1)  # (N k,) the expert of each (token, slot) pair
        order = flat.argsort(stable=True)  # pairs sorted by expert
        token = order // self.top_k  # (N k,) the token of each sorted pair
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's pairs
        rows = flat_x[token].to(dtype)  # (N k, C)
        out_rows = self.experts(rows, offs)  # (N k, C)
        out_rows = out_rows * weights.reshape(-1)[order].unsqueeze(-1).to(out_rows.dtype)
        out = out_rows.new_zeros(B * T, C).index_add(0, token, out_rows)  # (N, C)
        if self.shared is not None:
            out = out + self.shared(flat_x)
        self._record(counts, scores, B * T)
        return self.drop(out.view(B, T, C))

    def _record(self, counts: torch.Tensor, scores: torch.Tensor, n: int) -> None:
        self.tokens_per_expert, self.n_tokens = counts.detach(), n
        if self.router.kind != "softmax":
            self.router_prob_sum = None
        else:  # detached unless asked: holding the graph would keep it alive until the next forward
            self.router_prob_sum = (scores if self.record_aux else scores.detach()).sum(dim=0)

    def active_params(self) -> int:
        """Parameters one token uses: the router, its k routed experts, the shared experts."""
        per_expert = sum(p.numel() // p.shape[0] for p in self.experts.parameters())  # shapes: global (EP)
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        return self.router.weight.numel() + self.top_k * per_expert + shared

    def inactive_params(self) -> int:
        """Parameters a token leaves unused: the E - k routed experts it is not sent to."""
        return sum(p.numel() for p in self.parameters()) - self.active_params()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def record_aux(model: nn.Module, on: bool = True) -> None:
    """Keep (or stop keeping) the graph of each MoE layer's router probabilities, so that `load_balancing_loss`
    can be trained with. Off by default: the sum is kept detached (the figure, not a loss to train with)."""
    for m in moe_layers(model):
        m.record_aux = on
        m.router_prob_sum = None


def load_balancing_loss(layers: Iterable[MoE]) -> torch.Tensor | None:
    """Switch Transformer's auxiliary loss over the last forward of `layers`, as transformers computes it for
    Mixtral, Qwen3-MoE and OLMoE: E * sum_e f_e P_e, with f_e the share of (token, expert) pairs sent to expert
    e and P_e its mean router probability, both over every layer's tokens together (k when balanced). None when
    no layer recorded its probabilities (sigmoid routers, which define no such loss). With a graph only when
    record_aux is set."""
    layers = [m for m in layers if m.router_prob_sum is not None]
    if not layers:
        return None
    n = sum(m.n_tokens for m in layers)
    counts = sum(m.tokens_per_expert.float() for m in layers)
    probs = sum(m.router_prob_sum for m in layers)
    return layers[0].n_experts * ((counts / n) * (probs / n)).sum()


def routing_load(layers: Iterable[MoE]) -> float | None:
    """The busiest expert's (token, expert) pairs over the mean, the largest over the layers' last forward
    (1.0: perfectly balanced; E / k: every token to the same experts). None without MoE layers."""
    loads = [
        (m.tokens_per_expert.max() / m.tokens_per_expert.float().mean()).item()
        for m in layers
        if m.tokens_per_expert is not None
    ]
    return max(loads) if loads else None


def routing_stats(model: nn.Module, reduce=None) -> tuple[float | None, float | None]:
    """(load, auxiliary loss) of the model's last forward: `routing_load` and `load_balancing_loss` (None
    where they do not apply: a dense model; the auxiliary loss of sigmoid routers). `reduce(t)`: sums a
    tensor over the data-parallel ranks in place (a sharded trial), so both are the global batch's, as one
    device computes them."""
    layers = [m for m in moe_layers(model) if m.tokens_per_expert is not None]
    if not layers:
        return None, None
    counts = torch.stack([m.tokens_per_expert.double() for m in layers])  # (L, E)
    probs = [m.router_prob_sum for m in layers]
    probs = torch.stack([p.detach().double() for p in probs]) if all(p is not None for p in probs) else None
    n = torch.tensor([float(m.n_tokens) for m in layers], dtype=torch.float64, device=counts.device)  # (L,)
    if reduce is not None:
        for t in (counts, n, *((probs,) if probs is not None else ())):
            reduce(t)
    load = (counts.max(dim=1).values / counts.mean(dim=1)).max().item()
    aux = None
    if probs is not None:  # E * sum_e f_e P_e over every layer's tokens together (load_balancing_loss)
        total = n.sum()
        aux = (layers[0].n_experts * (counts.sum(0) / total * probs.sum(0) / total).sum()).item()
    return load, aux


def expert_init_std(n_layers: int) -> float:
    """GPT-2's scaled init of residual projections, for the experts' down projections."""
    return 0.02 / math.sqrt(2 * n_layers)
