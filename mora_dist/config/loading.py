"""Loading a run config: YAML (safe loading), ``key.sub=value`` overrides, ``${VAR}`` expansion, and the error
messages that name the file, the field and the fix.

Unknown keys are fatal with a suggestion; retired keys say what replaced them; former spellings that still have
one meaning are mapped (a dataclass's ``upgrade_legacy``, e.g. ``mora.gated``). The values themselves are
checked once, by the dataclasses of ``schema.py`` as they are built.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from mora_dist.config.schema import RunConfig
from mora_dist.errors import ConfigError
from mora_dist.mora.config import MoRAConfigError


def expand_vars(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` like a shell."""
    def repl(m):
        name, default = m.group(1), m.group(3)
        return os.environ.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", repl, text)


RETIRED_KEYS = {
    "prune.min_usage": "pruning is bounded by the measured output change; remove the key and set "
                       "prune.max_output_change (e.g. 0.01)",
    "prune.min_mass_share": "pruning is bounded by the measured output change; remove the key and set "
                            "prune.max_output_change (e.g. 0.01)",
}


def _build(cls, data: Any, where: str):
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
        if hasattr(cls, "upgrade_legacy"):  # former spellings with one meaning today (mora.gated)
            try:
                data = cls.upgrade_legacy(data)
            except MoRAConfigError as err:
                raise ConfigError(str(err)) from err
        hints = get_type_hints(cls)
        names = [f.name for f in fields(cls)]
        kwargs = {}
        for key, value in data.items():
            full = f"{where}.{key}" if where else str(key)
            if full in RETIRED_KEYS:
                raise ConfigError(f"{full} is no longer a setting: {RETIRED_KEYS[full]}")
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else \
                    f"; valid keys: {', '.join(names)}"
                raise ConfigError(f"unknown key {where + '.' if where else ''}{key}{hint}")
            kwargs[key] = _build(hints[key], value, f"{where}.{key}" if where else key)
        try:
            return cls(**kwargs)
        except MoRAConfigError as err:
            raise ConfigError(str(err)) from err
    origin = get_origin(cls)
    if origin is list:
        (item,) = get_args(cls)
        if not isinstance(data, list):
            raise ConfigError(f"{where}: expected a list")
        return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
    args = [a for a in get_args(cls) if a is not type(None)]
    if origin is not None and type(None) in get_args(cls):  # Optional[X]
        if data is None:
            return None
        return _build(args[0], data, where) if len(args) == 1 else data
    if cls is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if cls is float and isinstance(data, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(data)
        except ValueError:
            pass
    if cls in (int, float, str, bool) and not isinstance(data, cls) or (cls is int and isinstance(data, bool)):
        raise ConfigError(f"{where}={data!r}: expected {cls.__name__}")
    return data


def _parse_scalar(text: str):
    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars; ``tasks.0.lr=1e-4`` indexes lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = _parse_scalar(raw)
        else:
            node[last] = _parse_scalar(raw)
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (safe loading), apply overrides, build and check the typed config."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    try:
        cfg = _build(RunConfig, data, "")
    except ConfigError as err:
        raise ConfigError(f"{path or '<overrides>'}: {err}") from err
    cfg.data.root = expand_vars(cfg.data.root)
    cfg.run_dir = expand_vars(cfg.run_dir)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
