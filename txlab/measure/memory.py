"""One memory monitor for a measured window: peak bytes with a breakdown at the peak, on CPU and CUDA.

The breakdown comes from torch's MemTracker (a dispatch-mode tracker that sees every tensor storage
and tags it parameter / gradient / optimizer state / activation / temporary). On CPU its peak *is* the
peak; the process's resident high-water mark is read beside it as a check. On CUDA the caching
allocator's peak is the peak, and `other_bytes` takes what the allocator held beyond the tracked
categories (rounding, workspaces, backward temporaries).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager

import torch

from txlab.measure.records import Memory
from txlab.units import GiB


class BudgetExceeded(RuntimeError):
    """Tracked memory went over `measure.budget_gib` on a device without a hard cap (CPU): the tracker
    stopped the step there, so `tracked_bytes` is a lower bound of the peak."""

    def __init__(self, tracked_bytes: int, budget_bytes: int):
        self.tracked_bytes, self.budget_bytes = tracked_bytes, budget_bytes
        super().__init__(
            f"tracked memory reached {tracked_bytes / GiB:.3f} GiB, over the budget of {budget_bytes / GiB:.3f} GiB; "
            "stopped there (peak_bytes is a lower bound)"
        )


def mem_tracker_cls(sharded: bool = False):
    """torch's MemTracker (FSDPMemTracker for a model under FSDP2, whose categories tell sharded from
    gathered parameters and the collectives' buffers), with the budget guard and a cheaper peak update."""
    # Imported lazily: torch.distributed is a heavy import and only needed in a measured window.
    if sharded:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker as Base
        from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType as RefType
    else:
        from torch.distributed._tools.mem_tracker import MemTracker as Base
        from torch.distributed._tools.mem_tracker import _MemRefType as RefType

    class BudgetedTracker(Base):
        """The tracker that stops the step as soon as live tensors exceed a budget, so a CPU trial that
        would not fit never allocates past it (and never meets the kernel's OOM killer)."""

        def __init__(self, budget_bytes: int | None, *args):
            super().__init__(*args)  # FSDPMemTracker takes (model, optimizer)
            self.budget_bytes = budget_bytes
            self.on_op: Callable | None = None  # called with the tracker after every op (txlab.trial.extrapolate)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.on_op is None:
                return super().__torch_dispatch__(func, types, args, kwargs)
            self.op_args = args  # for on_op (which op of the step this is); never held past the op: a held
            try:  # gradient would be copied by autograd's accumulation instead of taken
                return super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                self.op_args = ()

        def _update_peak_stats(self, peak_state) -> None:  # called after every op
            # Only the global peak and its breakdown: MemTracker's per-module peaks (a walk over every
            # tracked module after every op, most of its cost) are not read by the monitor.
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)
            if self.budget_bytes is not None:
                total = sum(snap.get("Total", 0) for snap in self._curr_mem_snap.values())
                if total > self.budget_bytes:
                    raise BudgetExceeded(total, self.budget_bytes)
            if self.on_op is not None:
                self.on_op(self)

    return BudgetedTracker, RefType


# --- the CUDA caching allocator's rounding, for estimates made on fake CPU tensors -----------------

CUDA_MIN_BLOCK = 512  # every request is rounded up to a multiple of 512 bytes (kMinBlockSize)
CUDA_SMALL_SIZE = 2**20  # requests up to 1 MiB come from the small pool (kSmallSize)
CUDA_LARGE_SEGMENT = 10 * 2**20  # requests from 10 MiB get their own segment, rounded to 2 MiB (kMinLargeAlloc)
CUDA_ROUND_LARGE = 2 * 2**20  # kRoundLarge


def cuda_block_bytes(nbytes: int) -> int:
    """Bytes `torch.cuda.memory_allocated` counts for one storage of `nbytes` (default allocator config).

    Modelled: the 512-byte rounding of every request, and the large-segment rule: a request of
    10 MiB or more gets a fresh segment rounded up to 2 MiB, which is split only when more than 1 MiB
    would remain, so a request just under a 2 MiB multiple is charged the whole segment. Not modelled:
    best-fit reuse of cached blocks (a reused block larger than the request by at most 1 MiB is
    charged whole), which depends on the allocation history.
    """
    if nbytes <= 0:
        return 0
    size = -(-nbytes // CUDA_MIN_BLOCK) * CUDA_MIN_BLOCK
    if size >= CUDA_LARGE_SEGMENT:
        segment = -(-size // CUDA_ROUND_LARGE) * CUDA_ROUND_LARGE
        if segment - size <= CUDA_SMALL_SIZE:
            return segment
    return size


@contextmanager
def charge_as_cuda():
    """Charge every storage the tracker sees as the CUDA allocator would (see cuda_block_bytes).

    MemTracker rounds only storages on a CUDA device, and only to 512 bytes; the estimator runs on
    fake CPU tensors (fake CUDA tensors need a CUDA build), so it swaps in this accounting for the window.
    """
    from torch.distributed._tools import mem_tracker

    base = mem_tracker._WeakRefInfo

    class CudaWeakRefInfo(base):
        def _calculate_mem_consumed(self) -> int:
            return cuda_block_bytes(self.size * self.element_size)

    mem_tracker._WeakRefInfo = CudaWeakRefInfo
    try:
        yield
    finally:
        mem_tracker._WeakRefInfo = base


class MemoryMonitor:
    """`with MemoryMonitor(device, model, optimizer, inputs, budget) as mon: ...; mon.stats()`.

    `cuda_accounting=True` (the estimator) charges storages as the CUDA allocator would while the
    tensors themselves are fake CPU tensors; the peak is then the tracker's. `sharded=True`: the model is
    under FSDP2 (this rank's memory; parameters, gradients and optimizer state are this rank's shards).
    """

    def __init__(
        self,
        device: torch.device,
        model,
        optimizer,
        inputs: list[torch.Tensor],
        budget_bytes: int | None,
        cuda_accounting: bool = False,
        sharded: bool = False,
        on_op: Callable | None = None,
    ):
        tracker_cls, self._ref = mem_tracker_cls(sharded)
        self.device, self.sharded, self.model = device, sharded, model
        self._stack = ExitStack()
        if cuda_accounting:  # before track_external, so parameters and optimizer state are charged alike
            self._stack.enter_context(charge_as_cuda())
        # CUDA has a real cap (set_per_process_memory_fraction); the tracker's budget guard is for CPU.
        try:
            budget = budget_bytes if device.type == "cpu" else None
            if sharded:
                self.tracker = tracker_cls(budget, model, optimizer)
                self.tracker.track_inputs(tuple(inputs))
            else:
                self.tracker = tracker_cls(budget)
                self.tracker.track_external(model, optimizer, *inputs)
            self.tracker.on_op = on_op
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> MemoryMonitor:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        # A step of accumulated micro-batches calls the model once per micro-batch, which MemTracker refuses
        # as "multiple iterative calls": its per-module stats (unused here) are reset at each call of the
        # root. A global hook registered before the tracker's own runs first.
        from torch.nn.modules.module import register_module_forward_pre_hook

        root, tracker = self.model, self.tracker

        def again(module, args) -> None:
            if module is root and module in tracker.memory_tracking:
                tracker.reset_mod_stats()

        self._stack.callback(register_module_forward_pre_hook(again).remove)
        self.tracker.__enter__()
        if self.sharded:
            self._charge_unmanaged(root)
        return self

    def _charge_unmanaged(self, model) -> None:
        """Parameters FSDP2 leaves out (`ignored_params`: expert parallelism's experts where no further rank
        shares them, each rank's own) charged as this rank's parameters and gradients, as FSDP2's shards are;
        FSDPMemTracker would count them as `other`."""
        from torch.distributed.fsdp import FSDPModule

        groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)]
        managed = {id(fp.sharded_param) for g in groups if g is not None for fp in g.fsdp_params}
        tracker, R = self.tracker, self._ref

        def charge_grad(p) -> None:
            tracker._update_and_maybe_create_winfos(p.grad, R.SHARDED_GRAD)

        for p in model.parameters():
            if id(p) not in managed:
                tracker._update_and_maybe_create_winfos(p, R.SHARDED_PARAM)
                self._stack.callback(p.register_post_accumulate_grad_hook(charge_grad).remove)

    def __exit__(self, *exc) -> None:
        try:
            self.tracker.__exit__(*exc)
        finally:
            self._stack.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def end_step(self) -> None:
        """Call between steps: MemTracker keeps per-module stats for one iteration only."""
        self.tracker.reset_mod_stats()

    def stats(self) -> Memory:
        snap = self.tracker.get_tracker_snapshot("peak").get(self.device)
        if snap is None:  # MemTracker keys CPU tensors as device("cpu"); be lenient about the index
            snap = next(
                (s for d, s in self.tracker.get_tracker_snapshot("peak").items() if d.type == self.device.type), {}
            )
        if self.device.type == "cuda":
            peak, reserved = torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
            return memory_at(snap, self.sharded, peak, reserved)
        return memory_at(snap, self.sharded)


def memory_at(snap: dict, sharded: bool, peak: int | None = None, reserved: int | None = None) -> Memory:
    """The figures of a tracker snapshot (bytes by category, "Total"): the breakdown, and the peak (`peak`: the
    CUDA allocator's; None: the tracked total, a CPU's peak). Also what an extrapolated estimate's snapshot at its
    peak becomes (txlab.trial.extrapolate)."""
    _, R = mem_tracker_cls(sharded)
    if sharded:
        part = {
            "params_bytes": snap.get(R.SHARDED_PARAM, 0),
            "grads_bytes": snap.get(R.SHARDED_GRAD, 0) + snap.get(R.UNSHARDED_GRAD, 0),
            "optimizer_bytes": snap.get(R.OPT, 0),
            "activations_bytes": snap.get(R.ACT, 0),
            "gathered_params_bytes": snap.get(R.UNSHARDED_PARAM, 0),
            "comm_bytes": snap.get(R.ALL_GATHER, 0) + snap.get(R.REDUCE_SCATTER, 0),
        }
    else:
        part = {
            "params_bytes": snap.get(R.PARAM, 0),
            "grads_bytes": snap.get(R.GRAD, 0),
            "optimizer_bytes": snap.get(R.OPT, 0),
            "activations_bytes": snap.get(R.ACT, 0),
        }
    tracked = snap.get("Total", 0)
    peak = tracked if peak is None else peak
    other = max(0, peak - sum(part.values()))  # temporaries, buffers, inputs (+ allocator slack on CUDA)
    return Memory(peak_bytes=peak, other_bytes=other, tracked_peak_bytes=tracked, reserved_bytes=reserved, **part)


def measure_steps(
    device: torch.device,
    model,
    optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    budget_bytes: int | None = None,
    cuda_accounting: bool = False,
    sharded: bool = False,
    after_step: Callable[[int, torch.Tensor], None] | None = None,
    held: Sequence[torch.Tensor] = (),
    hold_losses: bool = True,
    on_op: Callable | None = None,
) -> tuple[Memory, torch.Tensor | None]:
    """The measured window every peak in txlab comes from: `step(x, y)` over `batches` under the monitor
    (every batch alive through the window, as a training loop holds them), the peak and its breakdown, and
    the last step's loss. `after_step(i, loss)` after each step (progress lines). Over `budget_bytes` on
    the CPU the tracker stops the step: BudgetExceeded (txlab.trial.pipeline makes it the over_budget
    outcome, its peak a lower bound). `held`: further tensors alive through the window (batches of steps
    taken before it). `hold_losses`: each step's loss tensor stays alive through the next step, as in a loop
    that assigns `loss = step(x, y)` (the measured trial's); the estimator's steps drop it (None returned).
    `on_op(tracker)`: after every op, with the tracker (its live bytes by device and category, its module tracker):
    an extrapolated estimate's timeline (txlab.trial.extrapolate)."""
    inputs = [*held, *(t for b in batches for t in b)]
    with MemoryMonitor(device, model, optimizer, inputs, budget_bytes, cuda_accounting, sharded, on_op) as monitor:
        loss = None
        for i, (x, y) in enumerate(batches):
            loss = step(x, y)
            monitor.end_step()
            if after_step is not None:
                after_step(i, loss)
            if not hold_losses:
                loss = None
    del inputs
    return monitor.stats(), loss


# --- resident set size (CPU check on the tracker) --------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssWindow:
    """Resident high-water mark above the baseline at the start of the window.

    On Linux the kernel's high-water mark is reset at the start (writing 5 to /proc/self/clear_refs),
    so earlier trials in the same process do not leak into this one. Elsewhere ru_maxrss is used,
    which cannot be reset: the figure is then only an upper bound.
    """

    def __enter__(self) -> RssWindow:
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            pass
        self.baseline = self._current()
        self.peak = None
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kib("VmHWM") if self.reset else None
        if hwm is not None:
            self.peak = max(0, hwm * 1024 - self.baseline)
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            self.peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - self.baseline)

    @staticmethod
    def _current() -> int:
        kib = _status_kib("VmRSS")
        if kib is not None:
            return kib * 1024
        import psutil

        return psutil.Process().memory_info().rss
