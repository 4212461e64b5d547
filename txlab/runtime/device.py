"""The devices of a trial: resolving `measure.device`, a device's name and capacity, the memory free now,
synchronizing, telling an out-of-memory error."""

from __future__ import annotations

import torch

from txlab.config.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"measure.device: {name!r} asked for but no CUDA device is available; allowed here: auto, cpu"
        )
    return dev


def device_kind(name: str) -> str:
    """ "cpu" or "cuda": the kind of device `measure.device` names (auto: what this machine has), without
    requiring it to exist (an estimate for CUDA runs on any machine)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def device_info(device: torch.device) -> tuple[str, int]:
    """The device's name ("cpu" or the CUDA device's) and its memory in bytes (RAM for the CPU)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.name, int(props.total_memory)
    import psutil

    return "cpu", int(psutil.virtual_memory().total)


def kind_info(kind: str) -> tuple[str, int | None]:
    """`device_info` of a device kind: this machine's CUDA device 0, or "cuda" and no capacity when it has
    none (an estimate made on a CPU-only machine)."""
    if kind == "cuda":
        if torch.cuda.is_available():
            return device_info(torch.device("cuda", 0))
        return "cuda", None
    return device_info(torch.device("cpu"))


def free_bytes(kind: str, device: str = "auto") -> int | None:
    """Memory the machine has free for a trial now: available RAM (CPU), free memory of the CUDA device
    `device` names (`measure.device`; the current one for auto/cuda)."""
    if kind == "cuda":
        if not torch.cuda.is_available():
            return None
        index = int(device[5:]) if device.startswith("cuda:") else torch.cuda.current_device()
        return int(torch.cuda.mem_get_info(index)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc)
    # CPU allocation failures surface as RuntimeError from the default allocator.
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "can't allocate memory" in msg or "out of memory" in msg.lower() or isinstance(exc, MemoryError)
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
