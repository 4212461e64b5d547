"""The typed trial config: defaults < file < overrides, unknown keys and bad values rejected by name.

A config stays a tree of plain dataclasses whose leaves are str/int/float/bool/None, so that it
flattens to dotted keys (`model.n_layers`) that are at once the `--set` syntax, the sweep grid syntax
and the Parquet column names. Variants (norm, attention, remat, ...) are strings resolved at build time.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """Bad user input: one line naming the key (or path) and what is allowed. The CLI exits 2 on it."""


# Keys that change how a trial is run or reported but not what is measured; left out of the trial key.
RUN_ONLY = "run_only"


# --- the tree -----------------------------------------------------------------------------------

Norm = Literal["layernorm", "rmsnorm"]
Pos = Literal["learned", "rope"]
Mlp = Literal["gelu", "swiglu"]
Quant = Literal["none", "int4"]
PolicyName = Literal["naive", "sdpa", "checkpoint", "selective", "recompute", "planned", "custom"]
Attention = Literal["sdpa", "math", "chunked"]
Remat = Literal["none", "block", "every", "sqrt", "selective", "planned"]
Loss = Literal["full", "chunked"]
Kv = Literal["cache", "grouped", "recompute"]
Kind = Literal["train", "prefill", "decode"]
Dtype = Literal["fp32", "bf16"]


@dataclass
class ModelConfig:
    size: str = "debug"  # named preset (MODEL_SIZES) that fills the keys below; explicit keys win
    n_layers: int = 4  # transformer blocks
    d_model: int = 256  # residual width
    n_heads: int = 4  # query heads; must divide d_model
    n_kv_heads: int = 4  # key/value heads (grouped-query attention when < n_heads); must divide n_heads
    vocab_size: int = 256  # tokens; 256 matches the byte tokenizer
    n_positions: Optional[int] = None  # learned position table size; None = workload.seq_len
    norm: Norm = "layernorm"  # pre-norm flavour
    pos: Pos = "learned"  # learned absolute positions or rotary embeddings
    mlp: Mlp = "gelu"  # 4x GELU MLP or SwiGLU (hidden 8/3 x d_model, rounded to 64)
    dropout: float = 0.0  # on embeddings and residual branches (never on attention probabilities)
    tie_weights: bool = True  # output projection shares the token embedding
    quant: Quant = "none"  # int4: weight-only attention/MLP projections, 2 values per byte (prefill/decode only)
    quant_group: int = 128  # weights per int4 scale (along the input dim); even, divides the projections' input widths


@dataclass
class PolicyConfig:
    name: PolicyName = "sdpa"  # preset (POLICY_PRESETS) that fills the keys below; explicit keys win
    attention: Attention = "sdpa"  # fused SDPA, materialized math (reference), or chunked online softmax
    q_chunk: int = 512  # query tile of chunked attention, tokens
    k_chunk: int = 512  # key tile of chunked attention, tokens
    remat: Remat = "none"  # activation recomputation, applied from outside the model
    remat_every: int = 1  # with remat=every: recompute blocks 0, k, 2k, ...
    loss: Loss = "full"  # full T x V logits, or projection + cross-entropy per loss_chunk tokens
    loss_chunk: int = 1024  # tokens per chunk of the chunked loss
    kv: Kv = "cache"  # prefill/decode: keep K/V (cache; grouped = GQA model) or recompute them from kept layer inputs


@dataclass
class WorkloadConfig:
    kind: Kind = "train"  # train = forward + backward + AdamW step; prefill = one no-grad forward; decode = prefill + decode_tokens
    seq_len: int = 1024  # tokens per sequence
    batch_size: int = 1  # sequences per step
    steps: int = 3  # timed steps (median step time over these)
    warmup_steps: int = 1  # untimed steps before measuring
    dtype: Dtype = "fp32"  # fp32, or bf16 autocast with fp32 master weights
    compile: bool = False  # torch.compile the blocks
    decode_tokens: int = 16  # tokens generated one at a time by decode workloads


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic (random tokens), corpus, text:PATH, parquet:PATH, hf:NAME[:CONFIG]
    tokenizer: str = "bytes"  # bytes (256 values + end-of-text = 257 ids) or hf:NAME_OR_PATH
    text_column: str = "text"  # column holding the text (parquet: and hf: sources)
    val_fraction: float = 0.05  # share of documents held out for evaluation; 0 = evaluate on training data
    workers: int = field(default=0, metadata={RUN_ONLY: True})  # data-loader worker processes (txlab train)


@dataclass
class TrainConfig:
    """`txlab train` only: the optimizer schedule, evaluation and checkpoints (a trial ignores it)."""

    steps: int = 1000  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup: int = 100  # steps of linear warm-up from 0 to lr
    hold: int = 0  # steps at lr after warm-up
    decay: Optional[int] = None  # steps of cosine decay to min_lr; None = the rest of the run
    weight_decay: float = 0.1  # AdamW, on weight matrices only (not embeddings, norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    grad_accum: int = 1  # micro-batches of workload.batch_size per optimizer step
    eval_every: int = 100  # steps between evaluations (and one at the end)
    eval_batches: int = 20  # held-out batches per evaluation
    log_every: int = field(default=10, metadata={RUN_ONLY: True})  # steps between progress lines
    checkpoint_every: int = field(default=0, metadata={RUN_ONLY: True})  # steps between checkpoints; 0 = at the end only
    out_dir: Optional[str] = field(default=None, metadata={RUN_ONLY: True})  # run directory; None = runs/<trial key>
    time_limit_s: Optional[float] = field(default=None, metadata={RUN_ONLY: True})  # stop (with a checkpoint) after this long


@dataclass
class MeasureConfig:
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    budget_gib: Optional[float] = None  # memory budget in GiB (2^30 bytes); CUDA caps the process at it


@dataclass
class TrialConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0  # seeds weights, data and dropout

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, the form of `--set`, sweep grids and Parquet columns."""
        return flatten(self.to_dict())

    @property
    def trial_key(self) -> str:
        return trial_key(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "policy": PolicyConfig,
    "workload": WorkloadConfig,
    "data": DataConfig,
    "measure": MeasureConfig,
    "train": TrainConfig,
}


# --- presets ------------------------------------------------------------------------------------

MODEL_SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, vocab_size=256),
    # GPT-2 family (Radford et al. 2019): vocab 50257, learned positions sized to the trial's seq_len.
    "gpt2-small": dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, vocab_size=50257),
    "gpt2-medium": dict(n_layers=24, d_model=1024, n_heads=16, n_kv_heads=16, vocab_size=50257),
    "gpt2-large": dict(n_layers=36, d_model=1280, n_heads=20, n_kv_heads=20, vocab_size=50257),
    "gpt2-xl": dict(n_layers=48, d_model=1600, n_heads=25, n_kv_heads=25, vocab_size=50257),
}

POLICY_PRESETS: dict[str, dict[str, Any]] = {
    "naive": dict(attention="math", remat="none", loss="full"),
    "sdpa": dict(attention="sdpa", remat="none", loss="full"),
    "checkpoint": dict(attention="sdpa", remat="block", loss="full"),
    "selective": dict(attention="sdpa", remat="selective", loss="full"),
    "recompute": dict(attention="chunked", remat="block", loss="chunked"),
    "planned": dict(attention="sdpa", remat="planned", loss="full"),
    # no preset values: every policy key comes from the file/overrides or the defaults
    "custom": dict(),
}

# Chunk sizes a preset fills in are clamped to the sequence (a preset is a recipe, not a demand);
# chunk sizes a user writes are checked strictly.
_CHUNK_KEYS = ("q_chunk", "k_chunk", "loss_chunk")

# Not built yet: refused with a clear error instead of being silently ignored (none at the moment).
NOT_IMPLEMENTED: dict[str, tuple[Any, ...]] = {}
# Names, or prefixes ending in ':' that take an argument (a path, a hub name).
DATA_SOURCES = ("synthetic", "corpus", "text:", "parquet:", "hf:")
TOKENIZERS = ("bytes", "hf:")
BYTE_VOCAB = 257  # the byte tokenizer's ids: 256 byte values + end-of-text


# --- flattening, parsing, merging ---------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def all_keys() -> list[str]:
    """Every dotted config key, in declaration order."""
    return list(flatten(dataclasses.asdict(_defaults_unvalidated())).keys())


def _defaults_unvalidated() -> TrialConfig:
    obj = object.__new__(TrialConfig)
    for f in fields(TrialConfig):
        object.__setattr__(obj, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)  # type: ignore[misc]
    return obj


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Put `value` at dotted `key` into a nested dict, checking that the key exists."""
    known = all_keys()
    if key not in known:
        sections = sorted({k.split(".")[0] for k in known})
        head = key.split(".")[0]
        if head in sections:
            where = [k for k in known if k.startswith(head + ".")]
            raise ConfigError(f"unknown key '{key}'{_suggest(key, where)}; allowed: {', '.join(where)}")
        hint = _suggest(head, sections)
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


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of nested dicts; `over` wins. Dotted keys at any level are expanded first."""
    out = expand_dotted(base)
    for k, v in expand_dotted(over).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def expand_dotted(tree: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if not isinstance(k, str):
            raise ConfigError(f"key {k!r}: keys must be strings")
        v = expand_dotted(v) if isinstance(v, dict) else v
        if "." in k:
            head, rest = k.split(".", 1)
            v = {rest: v}
            v = expand_dotted(v)
            k = head
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# --- building -----------------------------------------------------------------------------------


_YAML11_EXPONENT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` coerced to the field's type (int -> float only), or raise naming the key."""
    origin = get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, args[0])
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed:
            hint = _suggest(str(value), [str(a) for a in allowed])
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
            raise ConfigError(
                f"unknown key '{name}.{k}'{_suggest(f'{name}.{k}', dotted)}; allowed: {', '.join(dotted)}"
            )
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in raw:
            kwargs[f.name] = _check_type(f"{name}.{f.name}", raw[f.name], hints[f.name])
        elif f.name in preset:
            kwargs[f.name] = preset[f.name]
    return cls(**kwargs)


def build_config(raw: dict[str, Any] | None = None) -> TrialConfig:
    """Resolve a nested (or dotted) dict of user values into a validated TrialConfig.

    Order: dataclass defaults < size/policy preset < the user's values.
    """
    raw = expand_dotted(dict(raw or {}))
    top_known = list(SECTIONS) + ["seed"]
    for k, v in raw.items():
        if k not in top_known:
            raise ConfigError(f"unknown key '{k}'{_suggest(k, top_known)}; allowed: {', '.join(top_known)}")
        if k in SECTIONS and not isinstance(v, dict):
            raise ConfigError(f"{k}: must be a mapping of {k}.* keys, got {v!r}")

    model_raw = raw.get("model", {})
    size = _check_type("model.size", model_raw.get("size", "debug"), str)
    if size not in MODEL_SIZES:
        raise ConfigError(
            f"model.size: unknown size {size!r}{_suggest(size, list(MODEL_SIZES))}; allowed: {', '.join(MODEL_SIZES)}"
        )
    model_preset = dict(MODEL_SIZES[size])
    if "n_heads" in model_raw and "n_kv_heads" not in model_raw:
        model_preset.pop("n_kv_heads")  # follows n_heads below, as in the MHA presets
    model = _build_section("model", ModelConfig, model_raw, model_preset)
    if "n_heads" in model_raw and "n_kv_heads" not in model_raw:
        model.n_kv_heads = model.n_heads

    workload = _build_section("workload", WorkloadConfig, raw.get("workload", {}), {})

    policy_raw = raw.get("policy", {})
    name = _check_type("policy.name", policy_raw.get("name", "sdpa"), PolicyName)
    policy_preset = dict(POLICY_PRESETS[name])
    policy = _build_section("policy", PolicyConfig, policy_raw, policy_preset)
    tokens = workload.seq_len
    for k in _CHUNK_KEYS:
        if k not in policy_raw and isinstance(tokens, int) and tokens > 0:
            setattr(policy, k, min(getattr(policy, k), tokens))

    data = _build_section("data", DataConfig, raw.get("data", {}), {})
    if "vocab_size" not in model_raw and data.tokenizer == "bytes" and data.source != "synthetic":
        # Real text needs the end-of-text id: a preset's vocabulary grows to hold it (a recipe, not a
        # demand, like preset chunk sizes); a vocab_size the user writes is checked strictly.
        model.vocab_size = max(model.vocab_size, BYTE_VOCAB)
    measure = _build_section("measure", MeasureConfig, raw.get("measure", {}), {})
    train = _build_section("train", TrainConfig, raw.get("train", {}), {})
    seed = _check_type("seed", raw.get("seed", 0), int)
    return TrialConfig(model=model, policy=policy, workload=workload, data=data, measure=measure, train=train, seed=seed)


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


# --- validation ---------------------------------------------------------------------------------


def _positive(key: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: TrialConfig) -> None:
    """Cross-field checks. Each failure is one line naming the key(s) and what is allowed."""
    m, p, w, d, ms = cfg.model, cfg.policy, cfg.workload, cfg.data, cfg.measure
    for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "vocab_size", "quant_group"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.n_positions", m.n_positions)
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads: must divide model.d_model ({m.d_model} % {m.n_heads} != 0)")
    if m.n_kv_heads > m.n_heads or m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads: must divide model.n_heads ({m.n_heads} % {m.n_kv_heads} != 0)"
            if m.n_kv_heads <= m.n_heads
            else f"model.n_kv_heads: must be <= model.n_heads ({m.n_kv_heads} > {m.n_heads})"
        )
    if m.pos == "rope" and (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"model.pos: rope needs an even head dim (d_model/n_heads = {m.d_model // m.n_heads})")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")

    for key in ("seq_len", "batch_size", "steps", "decode_tokens"):
        _positive(f"workload.{key}", getattr(w, key))
    _positive("workload.warmup_steps", w.warmup_steps, allow_zero=True)
    if m.pos == "learned" and m.n_positions is not None and w.seq_len > m.n_positions:
        raise ConfigError(
            f"workload.seq_len: {w.seq_len} is over model.n_positions ({m.n_positions}); raise model.n_positions or leave it null"
        )

    for key in ("q_chunk", "k_chunk", "loss_chunk", "remat_every"):
        _positive(f"policy.{key}", getattr(p, key))
    if p.attention == "chunked":
        for key in ("q_chunk", "k_chunk"):
            if getattr(p, key) > w.seq_len:
                raise ConfigError(f"policy.{key}: {getattr(p, key)} is larger than workload.seq_len ({w.seq_len})")
    if p.loss == "chunked" and p.loss_chunk > w.seq_len:
        raise ConfigError(f"policy.loss_chunk: {p.loss_chunk} is larger than workload.seq_len ({w.seq_len})")
    if p.remat == "every" and p.remat_every > m.n_layers:
        raise ConfigError(f"policy.remat_every: {p.remat_every} is larger than model.n_layers ({m.n_layers})")
    if p.remat == "planned" and ms.budget_gib is None:
        raise ConfigError("policy.remat: 'planned' chooses what to recompute for measure.budget_gib; set measure.budget_gib")
    if p.kv == "grouped" and m.n_kv_heads == m.n_heads:
        raise ConfigError("policy.kv: 'grouped' needs model.n_kv_heads < model.n_heads")
    _validate_inference(m, p, w)

    for key, values in NOT_IMPLEMENTED.items():
        section, leaf = key.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if value in values:
            raise ConfigError(f"{key}: {value!r} is not implemented yet in this version of txlab")
    if not _gate_match(d.source, DATA_SOURCES):
        allowed = "synthetic, corpus, text:PATH, parquet:PATH, hf:NAME[:CONFIG]"
        raise ConfigError(f"data.source: unknown source {d.source!r}; allowed: {allowed}")
    if not _gate_match(d.tokenizer, TOKENIZERS):
        raise ConfigError(f"data.tokenizer: unknown tokenizer {d.tokenizer!r}; allowed: bytes, hf:NAME_OR_PATH")
    if d.tokenizer == "bytes" and d.source != "synthetic" and m.vocab_size < BYTE_VOCAB:
        raise ConfigError(
            f"model.vocab_size: {m.vocab_size} is too small for data.tokenizer 'bytes' on data.source "
            f"{d.source!r} ({BYTE_VOCAB} ids: 256 byte values + end-of-text); set model.vocab_size >= {BYTE_VOCAB}"
        )
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {d.val_fraction}")
    _positive("data.workers", d.workers, allow_zero=True)
    t = cfg.train
    for key in ("steps", "grad_accum", "eval_every", "eval_batches", "log_every"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("warmup", "hold", "decay", "checkpoint_every"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    for key in ("lr", "time_limit_s"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("min_lr", "weight_decay", "grad_clip"):
        _positive(f"train.{key}", getattr(t, key), allow_zero=True)
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr: {t.min_lr} is above train.lr ({t.lr})")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            raise ConfigError(f"train.{key}: must be in [0, 1), got {getattr(t, key)}")

    dev = ms.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"measure.device: unknown device {dev!r}; allowed: auto, cpu, cuda, cuda:N")
    _positive("measure.budget_gib", ms.budget_gib)
    _positive("seed", cfg.seed, allow_zero=True)


def mlp_hidden(m: ModelConfig) -> int:
    """Hidden width of the MLP: 4 d for gelu; 8/3 d rounded up to 64 for swiglu (txlab.model builds it from this)."""
    return 4 * m.d_model if m.mlp == "gelu" else 64 * math.ceil(8 * m.d_model / 3 / 64)


def _validate_inference(m: ModelConfig, p: PolicyConfig, w: WorkloadConfig) -> None:
    inference = w.kind in ("prefill", "decode")
    if m.quant == "int4":
        if not inference:
            raise ConfigError(f"model.quant: 'int4' is inference only (weight-only, no gradients); "
                              f"allowed with workload.kind prefill or decode, got workload.kind {w.kind!r}")
        widths = sorted({m.d_model, mlp_hidden(m)})
        if m.quant_group % 2 or any(x % m.quant_group for x in widths):
            raise ConfigError(f"model.quant_group: {m.quant_group} must be even and divide the projections' input "
                              f"widths ({', '.join(map(str, widths))}), e.g. 64 or 128")
    if not inference:
        if p.kv != "cache":
            raise ConfigError(f"policy.kv: {p.kv!r} applies to workload.kind prefill or decode; "
                              f"with workload.kind {w.kind!r} leave it at 'cache'")
        return
    if p.remat == "planned":
        raise ConfigError(f"policy.remat: 'planned' plans recomputation for training; "
                          f"workload.kind {w.kind!r} runs no backward (use another policy.name)")
    if w.compile:
        raise ConfigError(f"workload.compile: not supported for workload.kind {w.kind!r}; allowed: false")
    if w.kind == "decode" and m.pos == "learned" and m.n_positions is not None and w.seq_len + w.decode_tokens > m.n_positions:
        raise ConfigError(
            f"workload.decode_tokens: seq_len {w.seq_len} + decode_tokens {w.decode_tokens} is over model.n_positions "
            f"({m.n_positions}); raise model.n_positions or leave it null"
        )


def _gate_match(value: str, allowed: tuple[str, ...]) -> bool:
    """`value` is one of the names, or a prefix ending in ':' followed by a non-empty argument."""
    return any(value == a if not a.endswith(":") else (value.startswith(a) and len(value) > len(a)) for a in allowed)


# --- identity -----------------------------------------------------------------------------------


def run_only_keys() -> set[str]:
    out = set()
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if f.metadata.get(RUN_ONLY):
                out.add(f"{section}.{f.name}")
    return out


def canonical(cfg: TrialConfig) -> dict[str, Any]:
    skip = run_only_keys()
    return {k: v for k, v in sorted(cfg.flat().items()) if k not in skip}


def trial_key(cfg: TrialConfig) -> str:
    """Stable hash of the resolved config (defaults and presets filled in, run-only keys left out)."""
    blob = json.dumps(canonical(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_from_flat(flat: dict[str, Any]) -> TrialConfig:
    """Rebuild a config from a stored row's dotted columns (preset names stay, resolved values win)."""
    keys = set(all_keys())
    raw: dict[str, Any] = {}
    for k, v in flat.items():
        if k in keys:
            set_dotted(raw, k, v)
    return build_config(raw)
