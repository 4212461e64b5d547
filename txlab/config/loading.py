"""Building a config: defaults < preset < YAML file < overrides (`--set`, a sweep's grid point).

Reads YAML with the safe loader (bounded nesting), checks every key and type by name, fills presets,
and rebuilds a config from a stored row's dotted columns.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from txlab.config.errors import ConfigError, UnusedKey, suggest
from txlab.config.hf import model_keys, read_hf_config
from txlab.config.presets import CHUNK_KEYS, MODEL_SIZES, POLICY_PRESETS
from txlab.config.schema import (
    SECTIONS,
    DataConfig,
    MeasureConfig,
    ModelConfig,
    ParallelConfig,
    PolicyConfig,
    PolicyName,
    TrainConfig,
    TrialConfig,
    WorkloadConfig,
)
from txlab.config.tree import expand_dotted, flatten
from txlab.config.validate import BYTE_VOCAB


def all_keys() -> list[str]:
    """Every dotted config key, in declaration order."""
    return list(flatten(dataclasses.asdict(_defaults_unvalidated())).keys())


def _defaults_unvalidated() -> TrialConfig:
    obj = object.__new__(TrialConfig)
    for f in fields(TrialConfig):
        object.__setattr__(
            obj, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        )  # type: ignore[misc]
    return obj


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Put `value` at dotted `key` into a nested dict, checking that the key exists."""
    known = all_keys()
    if key not in known:
        sections = sorted({k.split(".")[0] for k in known})
        head = key.split(".")[0]
        if head in sections:
            where = [k for k in known if k.startswith(head + ".")]
            raise ConfigError(f"unknown key '{key}'{suggest(key, where)}; allowed: {', '.join(where)}")
        hint = suggest(head, sections)
        raise ConfigError(f"unknown key '{key}': no section '{head}'{hint}; allowed: {', '.join(sections)}")
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.setdefault(p, {}), dict):
            raise ConfigError(f"{p}: must be a mapping, got {type(node[p]).__name__}")
        node = node[p]
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with VALUE read as YAML (so 3 is an int, true a bool, null None)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. workload.seq_len=2048")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key, value


MAX_DEPTH = 16  # nesting a config or spec file may have (they need 3); deeper is hostile or a mistake


def _depth(node: Any, limit: int = MAX_DEPTH + 1, seen: dict[int, int] | None = None) -> int:
    """Nesting depth of mappings and lists, counted no further than `limit`; a node shared through YAML
    aliases is measured once (so an alias "bomb" costs its size in the file, not its expansion)."""
    if limit <= 0 or not isinstance(node, (dict, list)):
        return 0
    seen = {} if seen is None else seen
    if id(node) not in seen:
        children = node.values() if isinstance(node, dict) else node
        seen[id(node)] = 1 + max((_depth(c, limit - 1, seen) for c in children), default=0)
    return seen[id(node)]


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{path}: {what} file not found")
    if p.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a {what} YAML file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read {what} file ({e.__class__.__name__}: {e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: {what} nested too deeply to be a txlab {what}") from None
    if data is None:
        return {}
    if _depth(data) > MAX_DEPTH:
        raise ConfigError(f"{path}: {what} nested deeper than {MAX_DEPTH} levels; a txlab {what} is a few levels deep")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the {what} must be a YAML mapping, got {type(data).__name__}")
    return data


# --- building -----------------------------------------------------------------------------------


_YAML11_EXPONENT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` coerced to the field's type (int -> float only), or raise naming the key."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # Optional[X] and X | None
        args = [a for a in get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, args[0])
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed:
            hint = suggest(str(value), [str(a) for a in allowed])
            raise ConfigError(f"{key}: unknown value {value!r}{hint}; allowed: {', '.join(map(str, allowed))}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if annotation is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-3 as a string: it wants 1.0e-3
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    raise TypeError(f"unsupported annotation for {key}: {annotation!r}")


def _build_section(name: str, cls: type, raw: dict[str, Any], preset: dict[str, Any]) -> Any:
    known = [f.name for f in fields(cls)]
    for k in raw:
        if k not in known:
            dotted = [f"{name}.{x}" for x in known]
            raise ConfigError(f"unknown key '{name}.{k}'{suggest(f'{name}.{k}', dotted)}; allowed: {', '.join(dotted)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in raw:
            kwargs[f.name] = _check_type(f"{name}.{f.name}", raw[f.name], hints[f.name])
        elif f.name in preset:
            kwargs[f.name] = preset[f.name]
    return cls(**kwargs)


def _model_preset(model_raw: dict[str, Any]) -> dict[str, Any]:
    """The layer under the user's model keys: a named size, or a checkpoint's config.json (model.hf)."""
    hf = model_raw.get("hf")
    if hf is not None:
        hf = _check_type("model.hf", hf, str)
        if model_raw.get("size", "hf") != "hf":  # a size preset and a checkpoint would both name the shape
            raise ConfigError(
                f"model.size: {model_raw['size']!r} and model.hf both give the model's shape; with model.hf "
                "set model.size to 'hf' (or drop it)"
            )
        return {**model_keys(read_hf_config(hf)), "size": "hf"}
    size = _check_type("model.size", model_raw.get("size", "debug"), str)
    if size not in MODEL_SIZES:
        raise ConfigError(
            f"model.size: unknown size {size!r}{suggest(size, list(MODEL_SIZES))}; allowed: {', '.join(MODEL_SIZES)}"
        )
    return dict(MODEL_SIZES[size])


def _build_model(model_raw: dict[str, Any]) -> ModelConfig:
    model_preset = _model_preset(model_raw)
    if "n_heads" in model_raw and "n_kv_heads" not in model_raw:
        model_preset.pop("n_kv_heads", None)  # follows n_heads below, as in the MHA presets
    model = _build_section("model", ModelConfig, model_raw, model_preset)
    if "n_heads" in model_raw and "n_kv_heads" not in model_raw:
        model.n_kv_heads = model.n_heads
    return model


def _chunk_use(key: str, policy: PolicyConfig, workload: WorkloadConfig) -> str | None:
    """Why the resolved trial runs no kernel that reads chunk size `key` (None when one does): the chunked
    attention reads q_chunk and k_chunk (training, prefill, a decode's prefill), decoding under policy.kv
    recompute reads k_chunk, the chunked loss reads loss_chunk (training only)."""
    if key == "loss_chunk":
        if workload.kind != "train":
            return f"workload.kind {workload.kind!r} computes no loss"
        return None if policy.loss == "chunked" else f"policy.loss is {policy.loss!r}, not chunked"
    if policy.attention == "chunked" or (key == "k_chunk" and workload.kind == "decode" and policy.kv == "recompute"):
        return None
    also = ", nor does this trial decode with policy.kv recompute" if key == "k_chunk" else ""
    return f"policy.attention is {policy.attention!r}, not chunked{also}"


def build_config(raw: dict[str, Any] | None = None, check_written: bool = True) -> TrialConfig:
    """Resolve a nested (or dotted) dict of user values into a validated TrialConfig.

    Order: dataclass defaults < size/policy preset < the user's values. `check_written`: a chunk size the
    user wrote that the resolved policy does not use is refused (UnusedKey); off when rebuilding a stored
    row, which holds every key.
    """
    raw = expand_dotted(dict(raw or {}))
    top_known = list(SECTIONS) + ["seed"]
    for k, v in raw.items():
        if k not in top_known:
            raise ConfigError(f"unknown key '{k}'{suggest(k, top_known)}; allowed: {', '.join(top_known)}")
        if k in SECTIONS and not isinstance(v, dict):
            raise ConfigError(f"{k}: must be a mapping of {k}.* keys, got {v!r}")

    model = _build_model(raw.get("model", {}))
    workload = _build_section("workload", WorkloadConfig, raw.get("workload", {}), {})

    policy_raw = raw.get("policy", {})
    name = _check_type("policy.name", policy_raw.get("name", "sdpa"), PolicyName)
    policy_preset = dict(POLICY_PRESETS[name])
    policy = _build_section("policy", PolicyConfig, policy_raw, policy_preset)
    tokens = workload.seq_len
    for k in CHUNK_KEYS:
        if k not in policy_raw and isinstance(tokens, int) and tokens > 0:
            setattr(policy, k, min(getattr(policy, k), tokens))

    data = _build_section("data", DataConfig, raw.get("data", {}), {})
    if "vocab_size" not in raw.get("model", {}) and data.tokenizer == "bytes" and data.source != "synthetic":
        # Real text needs the end-of-text id: a preset's vocabulary grows to hold it (a recipe, not a
        # demand, like preset chunk sizes); a vocab_size the user writes is checked strictly.
        model.vocab_size = max(model.vocab_size, BYTE_VOCAB)
    measure = _build_section("measure", MeasureConfig, raw.get("measure", {}), {})
    train = _build_section("train", TrainConfig, raw.get("train", {}), {})
    parallel = _build_section("parallel", ParallelConfig, raw.get("parallel", {}), {})
    seed = _check_type("seed", raw.get("seed", 0), int)
    cfg = TrialConfig(
        model=model, policy=policy, workload=workload, data=data, measure=measure, train=train, parallel=parallel,
        seed=seed,
    )  # fmt: skip
    for k in CHUNK_KEYS if check_written else ():
        why = _chunk_use(k, policy, workload) if k in policy_raw else None
        if why is not None:
            raise UnusedKey(
                f"policy.{k}",
                f"policy.{k}: {getattr(policy, k)} is not used: {why} (policy.name {name!r}); "
                f"drop policy.{k}, or choose a policy that uses it",
            )
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrialConfig:
    """Defaults < YAML file < overrides (`KEY=VALUE` strings or a dotted dict, e.g. a Tune trial)."""
    raw: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    raw = expand_dotted(raw)
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [parse_override(s) for s in overrides or []]
    for k, v in items:
        set_dotted(raw, k, v)
    return build_config(raw)


def config_from_flat(flat: dict[str, Any]) -> TrialConfig:
    """Rebuild a config from a stored row's dotted columns (preset names stay, resolved values win)."""
    keys = set(all_keys())
    raw: dict[str, Any] = {}
    for k, v in flat.items():
        if k in keys:
            set_dotted(raw, k, v)
    return build_config(raw, check_written=False)
