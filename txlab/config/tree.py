"""Nested dicts of config values: flattening to dotted keys and back, and deep merging."""

from __future__ import annotations

from typing import Any

from txlab.config.errors import ConfigError

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
