"""How a run configuration is read: typed sections built from plain values (Literal choices, lists, finite
numbers), YAML presets that compose `base:` presets, `section.key=value` overrides, keys moved by an earlier
ddmim, and each section's own `check`. The schema itself is `ddmim/config.py` and `ddmim/finetune_config.py`.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from importlib import resources
from typing import Any

import yaml

from ddmim.errors import UserError


def moved_keys(values: dict[str, Any], moves: dict[tuple[str, str], tuple[str, str] | None]) -> dict[str, Any]:
    """`values` with every old key of `moves` put at its new place or dropped. A moved value wins over one
    already there: old and new keys meet only where an old-style `--set` overrides a preset."""
    out = {name: dict(section) if isinstance(section, dict) else section for name, section in values.items()}
    for (section, key), target in moves.items():
        if isinstance(out.get(section), dict) and key in out[section]:
            value = out[section].pop(key)
            if not out[section]:  # a section all of whose keys moved (loss: now ddmim's) is gone
                del out[section]
            if target is not None:
                new = out.setdefault(target[0], {})
                if isinstance(new, dict):
                    new[target[1]] = value
    return out


PRESET_PACKAGES = {"pretrain": "ddmim.presets", "finetune": "ddmim.presets.finetune"}
# `_name.yaml` in ddmim/presets: a block that presets of either kind compose (`base: [_name, ...]`), not a preset
FRAGMENT_PREFIX = "_"


def preset_names(kind: str = "pretrain") -> list[str]:
    folder = resources.files(PRESET_PACKAGES[kind])
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")
                  and not p.name.startswith(FRAGMENT_PREFIX))


def _preset_file(name: str, kind: str, chain: tuple[str, ...]) -> dict[str, Any]:
    """A preset's own values merged over those of its `base` presets (in order: a later one wins)."""
    if name in chain:
        raise UserError(f"preset bases form a circle: {' -> '.join((*chain, name))}")
    package = PRESET_PACKAGES["pretrain" if name.startswith(FRAGMENT_PREFIX) else kind]
    path = resources.files(package).joinpath(f"{name}.yaml")
    if not path.is_file():
        raise UserError(f"preset {chain[-1] if chain else name} names base '{name}', which does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"preset file {path} is not YAML text: {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:160]}") from None
    if not isinstance(values, dict):
        raise UserError(f"preset file {path} holds a {type(values).__name__}, not sections of settings "
                        f"(model:, train:, ...)")
    bases = values.pop("base", [])
    names = [bases] if isinstance(bases, str) else bases
    if not isinstance(names, list) or not all(isinstance(base, str) for base in names):
        raise UserError(f"preset file {path}: base must name presets (a name or a list of names), got {bases!r}")
    merged: dict[str, Any] = {}
    for base in names:
        merged = _merge(merged, _preset_file(base, kind, (*chain, name)))
    return _merge(merged, values)


def preset_values(name: str, overrides: list[str] | None = None, kind: str = "pretrain",
                  typed: dict[str, Any] | None = None) -> dict[str, Any]:
    """A preset's values (its bases' included) with `section.key=value` overrides (text, read as YAML) and
    `typed` ones ({"section.key": value}, from typed command-line options) merged in; not yet checked."""
    if name not in preset_names(kind):
        raise UserError(f"unknown {kind} preset '{name}'; available: {', '.join(preset_names(kind))}")
    values = _preset_file(name, kind, ())
    values["name"] = name
    return with_overrides(values, overrides, typed)


def with_overrides(values: dict[str, Any], overrides: list[str] | None = None,
                   typed: dict[str, Any] | None = None) -> dict[str, Any]:
    for text in overrides or []:
        values = _merge(values, parse_override(text))
    for key, value in (typed or {}).items():
        values = _merge(values, nested(key, value))
    return values


def nested(key: str, value: Any) -> dict[str, Any]:
    """'optim.lr', 1e-3 -> {"optim": {"lr": 0.001}}."""
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"option key '{key}' has an empty part")
    for part in reversed(parts):
        value = {part: value}
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value}")
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value in allowed and isinstance(value, type(allowed[0])):
            return value
        raise UserError(f"{where} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    raise UserError(f"{where} must be of type {getattr(hint, '__name__', hint)}, got {value!r}")


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Builds a (nested) config dataclass from plain values, refusing unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise UserError(f"{where or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown option {where}{unknown[0]}; known in this section: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """`optim.lr=1e-3` -> {"optim": {"lr": 0.001}}; the value is read as YAML (lists: `[1,2]`)."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UserError(f"override '{text}': cannot read value '{raw}'") from None
    return nested(key, value)




def at_least(where: str, value, low) -> None:
    if value < low:
        raise UserError(f"{where} must be at least {low}, got {value}")


def check_sections(cfg: Any) -> None:
    """Runs the `check` of every section of `cfg` (a section's checks of its own values; checks across
    sections are the config's)."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section) and hasattr(section, "check"):
            section.check()
