"""Devices of a trial: resolving `measure.device`, its name and capacity, synchronizing, telling an OOM."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from txlab.config import ConfigError

        raise ConfigError(
            f"measure.device: {name!r} asked for but no CUDA device is available; allowed here: auto, cpu"
        )
    return dev


def device_info(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.name, int(props.total_memory)
    import psutil

    return "cpu", int(psutil.virtual_memory().total)


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
