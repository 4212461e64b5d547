"""Training checkpoints: one `checkpoint.pt` per run directory holding the config, weights, optimizer
state and data position; read back with `torch.load(weights_only=True)`, so a file with pickled code is
refused rather than run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from txlab.config import ConfigError, TrialConfig, build_config, canonical
from txlab.model.gpt import GPT

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(
    path: Path, cfg: TrialConfig, params: dict[str, torch.Tensor], optimizer, step: int, data_pos: int
) -> None:
    state = {
        "config": cfg.to_dict(),
        "model": {k: v.detach().cpu() for k, v in params.items()},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data_pos": data_pos,  # next global micro-batch index of the training split
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[GPT, TrialConfig]:
    """A checkpoint's model (no policy applied: plain fused attention, for sampling) and its config."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT
    if not p.is_file():
        raise ConfigError(
            f"--checkpoint: {path}: no checkpoint there (expected a {CHECKPOINT} file or a run directory)"
        )
    state = read_checkpoint(p, f"--checkpoint: {path}")
    try:
        cfg = build_config(state["config"], check_written=False)  # the whole resolved config, every key written
    except ConfigError as e:
        raise ConfigError(f"--checkpoint: {path}: its config is not valid here ({e})") from None
    model = GPT(cfg.model, cfg.workload.seq_len)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ConfigError(
            f"--checkpoint: {path}: weights do not fit its config ({str(e).splitlines()[0][:200]})"
        ) from None
    return model.to(device).eval(), cfg


def read_checkpoint(path: Path, where: str) -> dict[str, Any]:
    """A checkpoint as tensors and plain values only (`weights_only`: a file holding pickled code is
    refused, never run). Anything else is bad input named by `where`."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols: noise on a refused file
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError(
            f"{where}: not a txlab checkpoint (it holds objects other than tensors and plain "
            "values; refused, nothing in it was run)"
        ) from None
    except Exception as e:  # noqa: BLE001 - a file that is not our checkpoint is bad input
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{where}: not a txlab checkpoint ({e.__class__.__name__}: {first[:200]})") from None
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("config"), dict)
        or not isinstance(state.get("model"), dict)
    ):
        raise ConfigError(f"{where}: not a txlab checkpoint (no config and model state)")
    return state


def config_differences(a: TrialConfig, b_dict: dict[str, Any]) -> list[str]:
    # over the keys of both: a key added since 0.1 is left out of canonical() at its default, so a checkpoint
    # that set one differs from a config that leaves it (and the other way round)
    ca, cb = canonical(a), canonical(build_config(b_dict, check_written=False))
    return sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
