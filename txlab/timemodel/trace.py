"""The operator trace of one training step: every aten operator the real step dispatches (forward,
recomputation, backward, optimizer) and every collective, with what the time model costs it by: FLOPs,
bytes read and written, shapes and dtype, and for a collective the ranks of its group and the bytes it
moves. Recorded by a TorchDispatchMode around a step that runs on fake tensors (txlab.trial.trace), so a step
of any size is traced in seconds and nothing is computed.

FLOPs are the kernel's work, counted from shapes here: a GEMM 2·M·N·K; fused attention 4·B·H·Tq·Tk·D forward
(the causal share of query-key pairs when causal) and 2.5x that backward (flash attention's backward computes
five products to the forward's two, recomputing the scores). torch's FlopCounterMode counts 0 for CPU SDPA
(docs/time_model.md), so attention is never read from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

FRESH_MIN = 32 * 2**20  # outputs from this size are new pages on a CPU (glibc maps them afresh: first-touch faults)

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_scaled_mm"}
# Grouped GEMMs (mixture of experts): torch's and txlab's custom ops (txlab.model.moe), one GEMM per expert's rows
GROUPED = {"_grouped_mm", "expert_mm", "expert_mm_wgrad"}
ATTENTION_WORDS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
# Operators that move no data: views, metadata, allocation without initialisation, bookkeeping.
FREE = {
    "detach", "empty", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_local_scalar_dense",
    "set_", "resize_", "alias", "is_same_size", "_has_compatible_shallow_copy_type", "record_stream", "device",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_unsafe_view", "wait_tensor", "barrier",
}  # fmt: skip
FILLS = {"zero_", "fill_", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones",
         "new_full", "arange", "scalar_tensor", "randn", "rand", "randint", "normal_", "uniform_", "empty_like"}  # fmt: skip
GATHERS = {"embedding", "index_select", "gather", "nll_loss_forward", "nll_loss2d_forward"}
# Memory-bound families (a local profile measures each; a GPU's are all `memory` of its bandwidth).
FAMILIES = {
    "transcendental": ("gelu", "silu", "sigmoid", "tanh", "exp", "log", "erf", "pow", "rsqrt", "softmax", "sin", "cos"),
    "norm": ("layer_norm", "rms_norm", "group_norm", "batch_norm"),
    "reduce": ("sum", "mean", "amax", "amin", "max", "min", "norm", "var", "std", "argmax", "cumsum"),
    "gather": ("embedding", "index_select", "index_add", "gather", "scatter", "nll_loss"),
}
# A family of its own where one operator's rate differs several-fold from its family's: GELU's tanh form (GPT-2's
# `gelu_new`) runs at a third of the erf form's bytes/s on a CPU (22 against 7 GB/s on this machine's 2 cores).
# A profile calibrated before it existed prices it as `FALLBACK` says.
TANH_GELU = "gelu_tanh"
FALLBACK = {TANH_GELU: "transcendental"}
COLLECTIVES = (("reduce_scatter", "reduce_scatter"), ("allgather", "all_gather"), ("all_gather", "all_gather"),
               ("allreduce", "all_reduce"), ("all_reduce", "all_reduce"), ("alltoall", "all_to_all"),
               ("all_to_all", "all_to_all"), ("broadcast", "broadcast"))  # fmt: skip


@dataclass
class Op:
    """One dispatched operator as the time model sees it."""

    name: str  # aten overload, e.g. "aten.mm.default"
    cls: str  # matmul | attention | memory | collective
    phase: str  # forward | backward | optimizer
    flops: float = 0.0  # the kernel's FLOPs (matmul, attention)
    read: float = 0.0  # bytes read
    write: float = 0.0  # bytes written
    fresh: float = 0.0  # bytes of new outputs from FRESH_MIN up (CPU first-touch)
    dtype: str = "fp32"  # the compute dtype
    dims: tuple[int, ...] = ()  # matmul (M, N, K); attention (B*H, Tq, Tk, D)
    family: str = "elementwise"  # memory-bound family
    backward: bool = False  # an attention kernel's backward
    coll: str = ""  # collective kind: all_gather, reduce_scatter, all_reduce, all_to_all, broadcast
    group: tuple[int, ...] = ()  # a collective's ranks
    size: float = 0.0  # a collective's full buffer in bytes (gathered output, scattered input, reduced tensor)
    waits: int = -1  # index of the collective whose output this op reads first (-1: none)
    # FSDP2's own collectives (c10d ops; tensor parallelism's are functional collectives on activations):
    prefetch: bool = False  # a parameter all-gather, which FSDP2 issues ahead of the block that needs it
    background: bool = False  # a gradient reduce-scatter, which FSDP2 consumes on its own stream


DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _local(t: Any) -> Any:
    """A DTensor's local shard (what this rank computes on), anything else as it is."""
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors in `x`, a DTensor as its local shard (what this rank's kernel reads and writes: the mode sees
    an operator on DTensors before DTensor dispatches it on the shards, and a DTensor's numel is the global)."""
    out = []
    for t in tree_leaves(x):
        if isinstance(t, torch.Tensor):
            local = getattr(t, "_local_tensor", None)
            out.append(local if isinstance(local, torch.Tensor) else t)
    return out


def _nbytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - a tensor without storage (sparse, nested): no dependency tracked
        return None


def _arg(func, args, kwargs, name: str, default=None):
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            if name in kwargs:
                return kwargs[name]
            return args[i] if i < len(args) else default
    return default


def causal_share(tq: int, tk: int) -> float:
    """The share of query-key pairs a causal (top-left aligned) kernel computes: query i sees keys 0..i."""
    full = min(tq, tk)
    pairs = full * (full + 1) / 2 + max(0, tq - tk) * tk
    return pairs / (tq * tk)


class Recorder(TorchDispatchMode):
    """Records every operator dispatched under it into `ops`. `phase_optimizer` is set around the optimizer's
    step (by hooks); the backward is told by autograd's running graph task."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Op] = []
        self.optimizer = False
        # storage of a collective's output -> its op index, and the storage (weakly: it must still be alive)
        self._pending: dict[int, tuple[int, StorageWeakRef]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = self.classify(func, args, kwargs, out)
        if op is not None:
            if self._pending:
                for t in _tensors((args, kwargs)):
                    k = _key(t)
                    if k in self._pending:
                        index, storage = self._pending.pop(k)
                        if not storage.expired():  # else a new storage at a freed one's address: no dependency
                            op.waits = max(op.waits, index)
            self.ops.append(op)
            if op.cls == "collective":
                for t in _tensors(out) + _tensors(args[:1]):
                    k = _key(t)
                    if k is not None:
                        self._pending[k] = (len(self.ops) - 1, StorageWeakRef(t.untyped_storage()))
        return out

    def phase(self) -> str:
        if self.optimizer:
            return "optimizer"
        return "backward" if torch._C._current_graph_task_id() != -1 else "forward"

    def classify(self, func, args, kwargs, out) -> Op | None:
        ns = func.namespace
        base = func._schema.name.split("::")[-1]
        if ns in ("prim", "profiler") or base in FREE:
            return None
        returns = func._schema.returns
        if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            return None  # a view
        name = str(func)
        phase = self.phase()
        if ns in ("c10d", "_c10d_functional"):
            return self._collective(func, base, args, kwargs, out, phase)
        if base.rstrip("_") in MATMULS:  # in-place too (addmm_: the chunked loss accumulates its weight gradient)
            return self._matmul(func, base.rstrip("_"), args, kwargs, out, phase)
        if base in GROUPED:
            return self._grouped(func, base, args, kwargs, out, phase)
        if any(w in base for w in ATTENTION_WORDS):
            return self._attention(func, base, args, kwargs, out, phase)
        return self._memory(func, base, name, args, kwargs, out, phase)

    # --- classes -------------------------------------------------------------------------------------

    def _matmul(self, func, base, args, kwargs, out, phase) -> Op:
        a, b = (args[1], args[2]) if base in ("addmm", "baddbmm", "addbmm") else (args[0], args[1])
        a, b = _local(a), _local(b)  # a tensor-parallel GEMM computes on the shards
        outs = _tensors(out)
        batch = a.shape[0] if a.dim() == 3 else 1
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        read = _nbytes(_tensors(args))
        write = _nbytes(outs)
        return Op(
            str(func), "matmul", phase, flops=2.0 * batch * m * n * k, read=read, write=write,
            fresh=_fresh(outs), dtype=DTYPES.get(a.dtype, str(a.dtype)), dims=(batch * m, n, k),
        )  # fmt: skip

    def _grouped(self, func, base, args, kwargs, out, phase) -> Op:
        """2·M·N·K over all the experts' rows; the shape the efficiency curve sees is one expert's GEMM (its
        share of the rows, at an even routing)."""
        a, b = _local(args[0]), _local(args[1])
        if base == "expert_mm":  # x (M, K), w (E, N, K) -> (M, N)
            (m, k), (e, n) = a.shape, b.shape[:2]
        elif base == "expert_mm_wgrad":  # g (M, N), x (M, K), offs, E -> (E, N, K)
            (m, n), k, e = a.shape, b.shape[-1], args[3]
        else:  # _grouped_mm: a (M, K) x b (E, K, N), or a (N, M) x b (M, K) -> (E, N, K)
            m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
            e = _arg(func, args, kwargs, "offs").numel()
        outs = _tensors(out)
        return Op(
            str(func), "matmul", phase, flops=2.0 * m * n * k, read=_nbytes(_tensors(args)), write=_nbytes(outs),
            fresh=_fresh(outs), dtype=DTYPES.get(a.dtype, str(a.dtype)), dims=(max(1, m // max(1, e)), n, k),
        )  # fmt: skip

    def _attention(self, func, base, args, kwargs, out, phase) -> Op:
        q, k, v = (_local(_arg(func, args, kwargs, name)) for name in ("query", "key", "value"))
        backward = "backward" in base
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):  # an attention op of another signature
            return self._memory(func, base, str(func), args, kwargs, out, phase)
        *lead, tq, d = q.shape
        tk, dv = k.shape[-2], v.shape[-1]
        bh = 1
        for x in lead:
            bh *= x
        flops = 2.0 * bh * tq * tk * (d + dv)
        if _arg(func, args, kwargs, "is_causal", False):
            flops *= causal_share(tq, tk)
        if backward:
            flops *= 2.5  # five products (the scores recomputed, dV, dP, dQ, dK) to the forward's two
        outs = _tensors(out)
        return Op(
            str(func), "attention", phase, flops=flops, read=_nbytes(_tensors(args)), write=_nbytes(outs),
            fresh=_fresh(outs), dtype=DTYPES.get(q.dtype, str(q.dtype)), dims=(bh, tq, tk, d), backward=backward,
        )  # fmt: skip

    def _collective(self, func, base, args, kwargs, out, phase) -> Op | None:
        kind = next((k for word, k in COLLECTIVES if word in base), None)
        if kind is None:
            return None  # wait, barrier, send/recv bookkeeping
        sizes = [_nbytes(_tensors(a)) for a in args] + [_nbytes(_tensors(out))]
        fsdp = func.namespace == "c10d"
        return Op(
            str(func), "collective", phase, coll=kind, group=_group_ranks(args, kwargs), size=float(max(sizes)),
            prefetch=fsdp and kind == "all_gather", background=fsdp and kind == "reduce_scatter",
        )  # fmt: skip

    def _memory(self, func, base, name, args, kwargs, out, phase) -> Op:
        schema_args = func._schema.arguments
        written: list[torch.Tensor] = []
        read: list[torch.Tensor] = []
        for i, a in enumerate(args):
            ts = _tensors(a)
            info = schema_args[i].alias_info if i < len(schema_args) else None
            if info is not None and info.is_write:
                written += ts
                if base in ("copy_",) or base in FILLS:
                    continue  # overwritten, not read
            read += ts
        outs = [t for t in _tensors(out) if all(t is not w for w in written)]
        if base in FILLS:
            read = []
        elif base in GATHERS:  # reads the rows it gathers, not the whole table
            index = [t for t in read if not t.is_floating_point()]
            read = index + outs
        elif base == "nll_loss_backward":  # reads the targets and the incoming gradient, not the logits
            read = [t for t in read if not t.is_floating_point() or t.numel() == 1]
        family = next((f for f, words in FAMILIES.items() if any(w in base for w in words)), "elementwise")
        if base.startswith("gelu") and kwargs.get("approximate") == "tanh":
            family = TANH_GELU
        floating = [t for t in read + outs + written if t.is_floating_point()]
        dtype = DTYPES.get(floating[0].dtype, "fp32") if floating else "fp32"
        return Op(
            name, "memory", phase, read=_nbytes(read), write=_nbytes(outs) + _nbytes(written), fresh=_fresh(outs),
            dtype=dtype, family=family,
        )  # fmt: skip


# The collectives a row reports the traffic of (`comm_<kind>_bytes`, txlab.results.columns): FSDP's parameter
# all-gathers and gradient reduce-scatters, tensor parallelism's all-reduces and sequence-parallel gathers and
# scatters, expert parallelism's all-to-alls, context parallelism's K/V all-gather and dK/dV reduce-scatter.
TRAFFIC_KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")
# Of those, context parallelism's K/V exchange (`comm_kv_exchange_bytes`, a part of the all-gather and
# reduce-scatter bytes, not beside them): the functional all-gathers and reduce-scatters on the rank's CP group.
# The group alone does not tell them: with fsdp 1 FSDP2's group is the CP group, but FSDP2 runs c10d's ops,
# txlab.parallel.cp torch's functional ones (as DTensor does, whose collectives stay on the TP group).
KV_EXCHANGE = "kv_exchange"


def wire_bytes(op: Op) -> float:
    """Bytes one rank sends for collective `op` under ring algorithms: (n-1)/n of the full buffer (each rank
    passes on every shard but its own), twice that for an all-reduce (a reduce-scatter, then an all-gather), the
    whole buffer for a broadcast; nothing in a group of one."""
    n = len(op.group)
    if n <= 1:
        return 0.0
    share = (n - 1) / n
    return op.size * {"all_reduce": 2 * share, "broadcast": 1.0}.get(op.coll, share)


def is_kv_exchange(op: Op, cp_group: tuple[int, ...]) -> bool:
    """Whether collective `op` is context parallelism's K/V exchange, given the rank's CP group (see KV_EXCHANGE)."""
    return (
        len(cp_group) > 1 and sorted(op.group) == sorted(cp_group) and op.coll in ("all_gather", "reduce_scatter")
        and op.name.startswith("_c10d_functional.")
    )  # fmt: skip


def traffic(ops: list[Op], cp_group: tuple[int, ...] = ()) -> dict[str, int]:
    """Bytes this rank sends per step for each kind of TRAFFIC_KINDS, and of those the K/V exchange on the rank's
    CP group `cp_group` (KV_EXCHANGE) (the row's comm_*_bytes columns; the time model prices the same
    `wire_bytes` of each collective)."""
    out = dict.fromkeys((*TRAFFIC_KINDS, KV_EXCHANGE), 0.0)
    for op in ops:
        if op.cls == "collective" and op.coll in TRAFFIC_KINDS:
            out[op.coll] += wire_bytes(op)
            if is_kv_exchange(op, cp_group):
                out[KV_EXCHANGE] += wire_bytes(op)
    return {k: round(v) for k, v in out.items()}


def _fresh(outs: list[torch.Tensor]) -> float:
    return float(sum(n for n in (t.numel() * t.element_size() for t in outs) if n >= FRESH_MIN))


def _group_ranks(args, kwargs) -> tuple[int, ...]:
    import torch.distributed as dist

    for a in [*args, *kwargs.values()]:
        try:
            if isinstance(a, torch.ScriptObject):
                return tuple(dist.get_process_group_ranks(dist.ProcessGroup.unbox(a)))
            if isinstance(a, str):
                from torch.distributed.distributed_c10d import _resolve_process_group

                return tuple(dist.get_process_group_ranks(_resolve_process_group(a)))
        except Exception:  # noqa: BLE001 - a string that is no group name, a group torch cannot resolve
            continue
    return ()


def record_step(step, optimizer: torch.optim.Optimizer, *batch, recorder: Recorder | None = None) -> list[Op]:
    """Run `step(*batch)` under a Recorder (the optimizer's step told apart by its hooks) and return the ops.
    `recorder`: a Recorder of the caller's (a subclass that notes more per op: txlab.trial.extrapolate)."""
    rec = recorder if recorder is not None else Recorder()

    def pre(*_):
        rec.optimizer = True

    def post(*_):
        rec.optimizer = False

    handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
    try:
        with rec:
            step(*batch)
    finally:
        for h in handles:
            h.remove()
    return rec.ops
