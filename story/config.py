"""The strict YAML helpers that model presets and the daemon config share.

Both are operator-written YAML with `${VAR}` / `${VAR:-default}` substitutions, merged in a fixed
order and validated by pydantic. One expander serves both, so both treat an unset variable the same
way: without a default it is an error naming the file, the field and the variable, never a literal
`${VAR}` left in a path. Every error type is the caller's (PresetError, ConfigError), so messages
keep saying which file they came from.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml
from pydantic import ValidationError

VAR_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(value: Any, where: str, origin: str, error: type[Exception]) -> Any:
    """`value` (nested dicts and lists of strings) with every `${VAR}` replaced from the environment;
    an unset variable without a default raises `error` naming `origin` and the field path `where`."""
    if isinstance(value, dict):
        return {k: expand_vars(v, f"{where}.{k}" if where else str(k), origin, error) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_vars(v, f"{where}.{i}", origin, error) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        found = os.environ.get(m.group(1), m.group(2))
        if found is None:
            raise error(f"{origin}: {where}: environment variable {m.group(1)} is not set "
                        f"(write ${{{m.group(1)}:-default}} to give a fallback)")
        return found

    return VAR_PATTERN.sub(sub, value)


def read_mapping(text: str, origin: str, error: type[Exception]) -> dict[str, Any]:
    """A YAML document that must be a mapping (empty: {}); anything else raises `error`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{origin}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{origin}: expected a mapping at the top level")
    return data


def format_validation_errors(exc: ValidationError, origin: str) -> str:
    """One line per pydantic error: `origin: field.path: message`."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{origin}: {path}: {msg}")
    return "\n".join(lines)


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, mappings merged key by key (the later source wins)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
