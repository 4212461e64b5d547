"""The time of each traced operator on a hardware profile (txlab.timemodel.trace.Op -> seconds).

A GPU profile (the catalogue's or a user's) costs operators from its data-sheet figures and the calibrated
efficiency curves (txlab.hardware.efficiency): a matmul or attention kernel at its FLOPs over the reached
share of the peak, never faster than its bytes over the bandwidth; a memory-bound operator at its bytes over
the reached bandwidth; each at least a kernel's launch time; a collective at the bytes each rank puts on the
wire (ring algorithms: (n-1)/n of the buffer, twice for an all-reduce) over the link its group spans (the
intra-node link when all its ranks share a node, else the network), plus a fixed latency.

A `local` profile (txlab.timemodel.calibrate) replaces the curves by what was measured on this machine at the
trial's thread count: matmul FLOP/s by shape (nearest measured shapes, in log space), attention FLOP/s by
sequence length, bytes/s per memory-bound family, the first-touch cost of new pages (CPU), a per-operator
overhead, and gloo's collectives.
"""

from __future__ import annotations

import math
from typing import Any

from txlab.hardware import Profile
from txlab.timemodel.trace import FALLBACK, Op, wire_bytes

MEMORY_BYTES = 16 * 2**20  # the tensors txlab calibrate measures memory-bound families on (txlab.timemodel.calibrate)


class Coster:
    """Seconds of each operator of a trace on `profile` (`threads`: a CPU rank's threads, for a local
    profile's tables; `dtype`: the workload's, the peak an operator of another dtype falls back to)."""

    def __init__(self, profile: Profile, dtype: str, threads: int | None = None) -> None:
        self.p, self.e, self.dtype = profile, profile.efficiency, dtype
        self.t = profile.tables(threads)

    # --- peaks ----------------------------------------------------------------------------------------

    def _peak(self, dtype: str) -> float:
        peaks = self.p.peak_flops
        return peaks.get(dtype) or peaks.get(self.dtype) or max(peaks.values())

    def op_time(self, op: Op) -> float:
        if op.cls == "collective":
            return self.collective(op)
        if op.cls == "matmul":
            return self.matmul(op)
        if op.cls == "attention":
            return self.attention(op)
        return self.memory(op)

    def times(self, ops: list[Op]) -> list[float]:
        return [self.op_time(op) for op in ops]

    # --- operator classes ------------------------------------------------------------------------------

    def _floor(self) -> float:
        return self.t["op_overhead_us"] * 1e-6 if self.t else self.e.launch_s

    def _fresh(self, op: Op) -> float:
        if not self.t or not op.fresh or not self.t.get("fresh_gbps"):
            return 0.0
        return op.fresh / (self.t["fresh_gbps"] * 1e9)

    def _measured_bandwidth(self, family: str, footprint: float) -> float:
        """Bytes/s of a memory-bound operator of `family` moving `footprint` bytes on a local profile: the
        family's rate on cache-sized tensors, capped by the bandwidth at that size (log-interpolated between the
        cache-sized elementwise rate at 48 MiB moved and the large-tensor rate from 768 MiB)."""
        rates = self.t["memory_gbps"]
        family_rate = (rates.get(family) or rates.get(FALLBACK.get(family, "")) or rates["elementwise"]) * 1e9
        cache, dram = rates["elementwise"] * 1e9, self.t.get("dram_gbps", rates["elementwise"]) * 1e9
        lo, hi = 3 * MEMORY_BYTES, 48 * MEMORY_BYTES
        if footprint <= lo:
            bw = cache
        elif footprint >= hi:
            bw = dram
        else:
            f = math.log(footprint / lo) / math.log(hi / lo)
            bw = math.exp((1 - f) * math.log(cache) + f * math.log(dram))
        return min(family_rate, bw)

    def _bytes_time(self, op: Op) -> float:
        return (op.read + op.write) / (self.p.memory_bw * self.e.memory)

    def matmul(self, op: Op) -> float:
        table = self.t["matmul"].get(op.dtype) if self.t else None
        if table:
            rate = _nearest_rate(table, op.dims)
            return op.flops / rate + self._fresh(op) + self._floor()
        m = min(op.dims) if op.dims else 1
        eff = self.e.matmul * m / (m + self.e.matmul_knee)
        return max(op.flops / (self._peak(op.dtype) * eff), self._bytes_time(op), self._floor())

    def attention(self, op: Op) -> float:
        table = self.t["attention"].get(op.dtype) if self.t else None
        if table:
            rate = _attention_rate(table, op.dims[2], op.backward)
            return op.flops / rate + self._fresh(op) + self._floor()
        tk = op.dims[2] if op.dims else 1
        eff = self.e.attention * tk / (tk + self.e.attention_knee) * (self.e.attention_bwd if op.backward else 1.0)
        return max(op.flops / (self._peak(op.dtype) * eff), self._bytes_time(op), self._floor())

    def memory(self, op: Op) -> float:
        if self.t:
            moved = op.read + op.write
            return moved / self._measured_bandwidth(op.family, moved) + self._fresh(op) + self._floor()
        return max(self._bytes_time(op), self._floor())

    def link(self, group: tuple[int, ...]) -> tuple[float, str]:
        """The bandwidth (bytes/s per device) a group's ring collective moves at, and the link that limits it.

        Within a node: the intra-node link. Across nodes: a ring relays every shard through every member, so
        the bytes a node takes in from the network are those of one member, spread over the NICs of its g
        members (NCCL runs one ring per NIC): g x the network bandwidth per device, and never more than the
        intra-node link that relays them (FSDP over 8 GPUs of each node: 8 x; one GPU per node, as FSDP x TP 8
        puts it: 1 x)."""
        per_node = self.p.devices_per_node
        nodes: dict[int, int] = {}
        for r in group:
            nodes[r // per_node] = nodes.get(r // per_node, 0) + 1
        if len(nodes) <= 1:
            return self.p.link_bw, "intra-node"
        g = min(nodes.values())
        return min(self.p.link_bw, g * self.p.network_bw), "network"

    def collective(self, op: Op) -> float:
        wire = wire_bytes(op)
        if wire == 0:
            return 0.0
        if self.t and self.t.get("collectives"):
            measured = self.t["collectives"].get(op.coll) or self.t["collectives"]["all_gather"]
            latency_us, gbps = measured
            return latency_us * 1e-6 + wire / (gbps * 1e9)
        bw, _ = self.link(op.group)
        return self.e.comm_latency_s + wire / (bw * self.e.comm)


def _nearest_rate(table: list[list[float]], dims: tuple[int, ...], k: int = 3) -> float:
    """FLOP/s of a GEMM of `dims` (M, N, K) from measured [M, N, K, GFLOP/s] rows: the inverse-distance
    weighted geometric mean of the `k` nearest in log space."""
    logs = [math.log(max(d, 1)) for d in dims[:3]]
    scored = []
    for row in table:
        dist = math.sqrt(sum((math.log(x) - y) ** 2 for x, y in zip(row[:3], logs)))
        scored.append((dist, math.log(row[3] * 1e9)))
    scored.sort()
    near = scored[:k]
    if near[0][0] < 1e-9:
        return math.exp(near[0][1])
    w = [1 / d for d, _ in near]
    return math.exp(sum(wi * r for wi, (_, r) in zip(w, near)) / sum(w))


def _attention_rate(table: list[list[float]], tk: int, backward: bool) -> float:
    """FLOP/s of a fused attention kernel at key length `tk` from measured [T, fwd GFLOP/s, bwd GFLOP/s] rows:
    linear in log T between the measured lengths, the end rows' rates beyond them."""
    col = 2 if backward else 1
    rows = sorted(table)
    x = math.log(max(tk, 1))
    if x <= math.log(rows[0][0]):
        return rows[0][col] * 1e9
    for lo, hi in zip(rows, rows[1:]):
        a, b = math.log(lo[0]), math.log(hi[0])
        if x <= b:
            f = (x - a) / (b - a)
            return math.exp((1 - f) * math.log(lo[col]) + f * math.log(hi[col])) * 1e9
    return rows[-1][col] * 1e9


def describe_tables(t: dict[str, Any] | None) -> str:
    return "measured tables" if t else "data-sheet figures and calibrated efficiencies"
