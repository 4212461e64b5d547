"""Sweep specs: a YAML file that becomes a list of validated trial configs.

A spec is small on purpose (see docs/sweeps.md):

    name: smoke                           # the `sweep` column of every row; default: the file's stem
    description: ...                      # optional free text
    base: {model: {size: debug}}          # trial config every point starts from (nested or dotted keys)
    grid:                                 # dotted config key -> list of values; the product is the grid
      workload.seq_len: [512, 1024]
      policy.name: [sdpa, recompute]
    skip_if:                              # optional; a point matching any expression is skipped
      - "policy.q_chunk > workload.seq_len"
    resources: {cpu: 1, gpu: 0}           # per trial; gpu may be fractional (0.5 = two trials per GPU);
                                          # per rank for parallel.fsdp = N (N x these, gpu 0 or 1)
    max_concurrent: null                  # cap on trials running at once; null = as many as resources allow
    max_failures: 3                       # retries of a trial whose node or worker process died
    mode: measure                         # measure (run each trial) or estimate (txlab.trial.estimate: fake
                                          # tensors, rows with measured = false, no GPU needed)
    precheck: true                        # measure mode: estimate first; a trial predicted over its budget
                                          # or over the memory free is stored over_budget and not run

`skip_if` expressions are parsed with `ast` and may only hold comparisons (==, !=, <, <=, >, >=, in,
not in), `and`/`or`/`not`, dotted config keys and literals (numbers, strings, true/false/null, lists of
those). Nothing is called, nothing is looked up outside the trial config.
"""

from __future__ import annotations

import ast
import difflib
import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from txlab.config import (
    MODEL_SIZES,
    POLICY_PRESETS,
    ConfigError,
    TrialConfig,
    UnusedKey,
    all_keys,
    build_config,
    expand_dotted,
    flatten,
    merge,
    read_yaml_mapping,
)

SPEC_KEYS = (
    "name",
    "description",
    "base",
    "grid",
    "skip_if",
    "resources",
    "max_concurrent",
    "max_failures",
    "mode",
    "precheck",
)
MODES = ("measure", "estimate")
RESOURCE_KEYS = ("cpu", "gpu")
DEFAULT_MAX_FAILURES = 3
MAX_GRID_POINTS = 100_000  # a grid this large is a typo (or hostile); each point is validated before any runs


# --- skip_if: a tiny, safe expression language over config keys ------------------------------------

_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_LITERAL_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


@dataclass(frozen=True)
class SkipRule:
    """One `skip_if` expression, checked at load time, evaluated against a trial's flat config."""

    text: str
    tree: ast.Expression = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: Any, where: str) -> SkipRule:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(
                f'{where}: expected an expression string such as "policy.q_chunk > workload.seq_len", got {text!r}'
            )
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as e:
            raise ConfigError(f"{where}: {text!r} is not a valid expression ({e.msg})") from None
        known = set(all_keys())
        _check_node(tree.body, text, where, known, top=True)
        return cls(text.strip(), tree)

    def __call__(self, flat: dict[str, Any]) -> bool:
        try:
            return bool(_eval(self.tree.body, flat))
        except TypeError as e:
            raise ConfigError(f"skip_if {self.text!r}: cannot evaluate ({e})") from None


def _dotted_name(node: ast.AST) -> str | None:
    """`model.n_layers` parses as Attribute(Name('model'), 'n_layers'): join it back, or None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted_name(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def _check_node(node: ast.AST, text: str, where: str, known: set[str], top: bool = False) -> None:
    def bad(what: str) -> ConfigError:
        return ConfigError(
            f"{where}: {text!r}: {what}; allowed: comparisons (== != < <= > >= in, not in) joined by "
            "and/or/not, over dotted config keys and literals"
        )

    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check_node(v, text, where, known, top=True)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _check_node(node.operand, text, where, known, top=True)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _COMPARE:
                raise bad(f"operator {type(op).__name__} is not allowed")
        for operand in [node.left, *node.comparators]:
            _check_operand(operand, text, where, known, bad)
    elif top:
        if isinstance(node, ast.Call):
            raise bad("function calls are not allowed")
        raise bad(f"{type(node).__name__} is not a comparison")
    else:  # pragma: no cover - operands are checked by _check_operand
        raise bad(f"{type(node).__name__} is not allowed")


def _check_operand(node: ast.AST, text: str, where: str, known: set[str], bad) -> None:
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, (int, float, str, bool, type(None))):
            raise bad(f"literal {node.value!r} is not allowed")
        return
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, (ast.USub, ast.UAdd))
        and isinstance(node.operand, ast.Constant)
    ):
        if isinstance(node.operand.value, (int, float)) and not isinstance(node.operand.value, bool):
            return
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        for elt in node.elts:
            _check_operand(elt, text, where, known, bad)
        return
    if isinstance(node, ast.Call):
        raise bad("function calls are not allowed")
    name = _dotted_name(node)
    if name is not None:
        if name in _LITERAL_NAMES:
            return
        if name not in known:
            raise ConfigError(f"{where}: {text!r}: unknown config key '{name}'")
        return
    raise bad(f"{type(node).__name__} is not allowed")


def _eval(node: ast.AST, flat: dict[str, Any]) -> Any:
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            return all(_eval(v, flat) for v in node.values)
        return any(_eval(v, flat) for v in node.values)
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, flat)
        if isinstance(node.op, ast.Not):
            return not value
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Compare):
        left = _eval(node.left, flat)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, flat)
            ordering = type(op) in (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
            if ordering and (left is None or right is None):
                return False  # null is neither smaller nor larger than anything (as in SQL)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_eval(e, flat) for e in node.elts]
    name = _dotted_name(node)
    if name in _LITERAL_NAMES:
        return _LITERAL_NAMES[name]
    return flat[name]


# --- the spec -------------------------------------------------------------------------------------


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]  # nested trial config (user values only)
    grid: dict[str, list[Any]]  # dotted key -> values, in file order
    skip_if: list[SkipRule] = field(default_factory=list)
    cpu: float = 1.0
    gpu: float = 0.0
    max_concurrent: int | None = None
    max_failures: int = DEFAULT_MAX_FAILURES
    description: str = ""
    path: str = ""
    mode: str = "measure"  # measure | estimate
    precheck: bool = True  # measure mode: consult the estimator before running a trial

    @property
    def grid_size(self) -> int:
        n = 1
        for values in self.grid.values():
            n *= len(values)
        return n

    def points(self) -> list[dict[str, Any]]:
        """Every grid point as {dotted key: value}, first key slowest (the order of Tune's grid_search)."""
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]


@dataclass
class Trial:
    key: str
    point: dict[str, Any]  # the grid values of this trial
    config: TrialConfig

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.point.items())


@dataclass
class Expansion:
    spec: SweepSpec
    trials: list[Trial]  # validated, unique trial keys, grid order
    skipped: list[tuple[dict[str, Any], str]]  # (point, the skip_if expression that matched)
    duplicates: list[tuple[dict[str, Any], str]]  # (point, key) of points resolving to an earlier trial
    # (point, why) of points whose grid sets a chunk size their policy does not use (txlab.config.UnusedKey)
    unused: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    # base key -> trials it was not applied to: a chunk size of the base applies where the policy uses it
    unapplied: dict[str, int] = field(default_factory=dict)


def _where(path: str, key: str) -> str:
    return f"{path}: {key}" if path else key


def parse_spec(raw: dict[str, Any], path: str = "", default_name: str = "sweep") -> SweepSpec:
    """A spec mapping (read from YAML) -> a checked SweepSpec. Keys are checked in file-format order (the
    first bad one raises ConfigError naming it)."""
    _check_spec_keys(raw, path)
    name = _parse_name(raw, path, default_name)
    description = _parse_description(raw, path)
    base = _parse_base(raw, path)
    grid = _parse_grid(raw, path)
    rules = _parse_skip_if(raw, path)
    cpu, gpu = _parse_resources(raw, path)
    max_concurrent, max_failures = _parse_limits(raw, path)
    mode, precheck = _parse_mode(raw, path)
    return SweepSpec(
        name=name,
        base=base,
        grid=grid,
        skip_if=rules,
        cpu=cpu,
        gpu=gpu,
        max_concurrent=max_concurrent,
        max_failures=max_failures,
        description=description,
        path=path,
        mode=mode,
        precheck=precheck,
    )


def _check_spec_keys(raw: dict[str, Any], path: str) -> None:
    for k in raw:
        if k not in SPEC_KEYS:
            close = difflib.get_close_matches(str(k), SPEC_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{_where(path, str(k))}: unknown spec key '{k}'{hint}; allowed: {', '.join(SPEC_KEYS)}")


def _parse_name(raw: dict[str, Any], path: str, default_name: str) -> str:
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise ConfigError(f"{_where(path, 'name')}: expected a non-empty name without '/', got {name!r}")
    return name.strip()


def _parse_description(raw: dict[str, Any], path: str) -> str:
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{_where(path, 'description')}: expected text, got {description!r}")
    return description


def _parse_base(raw: dict[str, Any], path: str) -> dict[str, Any]:
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{_where(path, 'base')}: expected a mapping of config keys, got {base!r}")
    return expand_dotted(base)


def _parse_grid(raw: dict[str, Any], path: str) -> dict[str, list[Any]]:
    grid = raw.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(
            f"{_where(path, 'grid')}: expected a non-empty mapping of dotted config key -> list of values"
        )
    known = set(all_keys())
    clean_grid = {key: _grid_values(key, values, path, known) for key, values in grid.items()}
    points = math.prod(len(v) for v in clean_grid.values())
    if points > MAX_GRID_POINTS:
        raise ConfigError(f"{_where(path, 'grid')}: {points} grid points, more than {MAX_GRID_POINTS}; split the sweep")
    return clean_grid


def _grid_values(key: Any, values: Any, path: str, known: set[str]) -> list[Any]:
    """One grid axis: a known config key and a non-empty list of distinct scalars (a scalar is a list of one)."""
    if not isinstance(key, str) or key not in known:
        close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{_where(path, 'grid')}: '{key}' is not a config key{hint}")
    if not isinstance(values, list):
        values = [values]
    if not values:
        raise ConfigError(f"{_where(path, 'grid.' + key)}: empty list of values")
    for v in values:
        if isinstance(v, (dict, list)):
            raise ConfigError(f"{_where(path, 'grid.' + key)}: values must be scalars, got {v!r}")
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"{_where(path, 'grid.' + key)}: repeated value in {values!r}")
    return values


def _parse_skip_if(raw: dict[str, Any], path: str) -> list[SkipRule]:
    rules_raw = raw.get("skip_if") or []
    if isinstance(rules_raw, str):
        rules_raw = [rules_raw]
    if not isinstance(rules_raw, list):
        raise ConfigError(f"{_where(path, 'skip_if')}: expected a list of expressions, got {rules_raw!r}")
    return [SkipRule.parse(r, _where(path, f"skip_if[{i}]")) for i, r in enumerate(rules_raw)]


def _parse_resources(raw: dict[str, Any], path: str) -> tuple[float, float]:
    """(cpu, gpu) per trial."""
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict):
        raise ConfigError(
            f"{_where(path, 'resources')}: expected a mapping such as {{cpu: 1, gpu: 0.5}}, got {resources!r}"
        )
    for k in resources:
        if k not in RESOURCE_KEYS:
            raise ConfigError(
                f"{_where(path, 'resources')}: unknown resource '{k}'; allowed: {', '.join(RESOURCE_KEYS)}"
            )
    cpu = _number(resources.get("cpu", 1), _where(path, "resources.cpu"), allow_zero=False)
    gpu = _number(resources.get("gpu", 0), _where(path, "resources.gpu"), allow_zero=True)
    if gpu > 1 and gpu != int(gpu):
        raise ConfigError(f"{_where(path, 'resources.gpu')}: above 1 it must be a whole number of GPUs, got {gpu}")
    return cpu, gpu


def _parse_limits(raw: dict[str, Any], path: str) -> tuple[int | None, int]:
    """(max_concurrent, max_failures)."""
    max_concurrent = raw.get("max_concurrent")
    if max_concurrent is not None and (
        isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int) or max_concurrent < 1
    ):
        raise ConfigError(
            f"{_where(path, 'max_concurrent')}: expected a positive integer or null, got {max_concurrent!r}"
        )
    max_failures = raw.get("max_failures", DEFAULT_MAX_FAILURES)
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise ConfigError(f"{_where(path, 'max_failures')}: expected an integer >= 0, got {max_failures!r}")
    return max_concurrent, max_failures


def _parse_mode(raw: dict[str, Any], path: str) -> tuple[str, bool]:
    """(mode, precheck)."""
    mode = raw.get("mode", "measure")
    if mode not in MODES:
        raise ConfigError(f"{_where(path, 'mode')}: unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    precheck = raw.get("precheck", True)
    if not isinstance(precheck, bool):
        raise ConfigError(f"{_where(path, 'precheck')}: expected true or false, got {precheck!r}")
    return mode, precheck


def _number(value: Any, where: str, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}: expected a number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def load_spec(path: str | Path) -> SweepSpec:
    raw = read_yaml_mapping(path, what="sweep spec")
    return parse_spec(raw, path=str(path), default_name=Path(path).stem)


def _unvalidated_flat(raw: dict[str, Any]) -> dict[str, Any]:
    """defaults < size/policy presets < user values, without validation: what skip_if sees for a point
    that does not build (so a rule can drop exactly the combinations that would fail)."""
    flat = build_config({}).flat()
    user = flatten(expand_dotted(raw))
    size = user.get("model.size", flat["model.size"])
    for k, v in MODEL_SIZES.get(size, {}).items():
        flat[f"model.{k}"] = v
    name = user.get("policy.name", flat["policy.name"])
    for k, v in POLICY_PRESETS.get(name, {}).items():
        flat[f"policy.{k}"] = v
    flat.update(user)
    return flat


def _check_rank_resources(spec: SweepSpec, point: dict[str, Any], cfg: TrialConfig) -> None:
    """A measured `parallel.fsdp` = N trial takes N x the spec's resources, one share per rank, and a rank
    drives one GPU of its own (NCCL refuses two ranks on one device): resources.gpu is 0 or 1 there."""
    if spec.mode != "measure" or cfg.parallel.fsdp == 1 or spec.gpu in (0, 1):
        return
    label = ", ".join(f"{k}={v}" for k, v in point.items())
    raise ConfigError(
        f"{_where(spec.path, 'resources.gpu')}: {spec.gpu:g} per rank, but trial {{{label}}} has parallel.fsdp "
        f"{cfg.parallel.fsdp} and each rank uses one GPU of its own; allowed: 1 (or 0 on CPU); resources are per rank"
    )


def _drop_key(raw: dict[str, Any], dotted: str) -> None:
    *sections, leaf = dotted.split(".")
    node = raw
    for part in sections:
        node = node[part]
    del node[leaf]


def _build_point(base: dict[str, Any], point: dict[str, Any]):
    """(config or None, its ConfigError, the raw values, the base keys left out): a chunk size the base
    writes that this point's policy does not use is left out of the point (the base applies where it
    can); one the grid point sets is the point's error (UnusedKey: the point is dropped)."""
    raw, left_out = merge(base, point), []
    while True:
        try:
            return build_config(raw), None, raw, left_out
        except UnusedKey as e:
            if e.key in point:
                return None, e, raw, left_out
            _drop_key(raw, e.key)
            left_out.append(e.key)
        except ConfigError as e:
            return None, e, raw, left_out


def expand(spec: SweepSpec) -> Expansion:
    """Every grid point -> skipped, dropped (its grid sets a chunk size its policy does not use), or a
    validated trial. A point that fails validation otherwise raises ConfigError naming the point and the
    key, so a bad spec fails before anything runs."""
    e = Expansion(spec=spec, trials=[], skipped=[], duplicates=[])
    seen: set[str] = set()
    for point in spec.points():
        cfg, error, raw, left_out = _build_point(spec.base, point)
        flat = cfg.flat() if cfg is not None else _unvalidated_flat(raw)
        rule = next((r for r in spec.skip_if if r(flat)), None)
        if rule is not None:
            e.skipped.append((point, rule.text))
            continue
        if isinstance(error, UnusedKey):
            e.unused.append((point, str(error)))
            continue
        if cfg is None:
            label = ", ".join(f"{k}={v}" for k, v in point.items())
            raise ConfigError(f"{_where(spec.path, 'trial')} {{{label}}}: {error} (drop such points with skip_if)")
        _check_rank_resources(spec, point, cfg)
        key = cfg.trial_key
        if key in seen:
            e.duplicates.append((point, key))
            continue
        seen.add(key)
        for k in left_out:
            e.unapplied[k] = e.unapplied.get(k, 0) + 1
        e.trials.append(Trial(key=key, point=point, config=cfg))
    return e
