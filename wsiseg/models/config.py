"""Dataclasses <-> YAML files (``configs/``), strictly: unknown keys and wrong types are a :class:`ConfigError`."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..core.errors import ConfigError

T = TypeVar("T")

MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; a larger file is refused before it is parsed


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages quote a short excerpt, never a whole value."""
    r = repr(value) if not isinstance(value, (list, dict)) or len(value) < 1000 else f"<{type(value).__name__} " \
        f"of {len(value)} items>"
    return r if len(r) <= limit else r[:limit - 3] + "..."


class _Loader(yaml.SafeLoader):
    """YAML's safe loader without aliases (``*name``): a config needs none, and a few nested aliases expand a 1 KB
    file into gigabytes (the "billion laughs"); an alias is a parse error, found before anything expands."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a wsiseg config",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _parse(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:  # try the next member
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {_short(value)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_short(value)}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_short(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_short(value)}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # (YAML 1.1 reads 1e-4, without a dot, as a string)
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_short(value)}")
        if not math.isfinite(value):  # (a NaN learning rate or loss weight trained a model of NaNs, without a word)
            raise ConfigError(f"{where}: expected a finite number, got {_short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_short(value)}")
        return value
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys or wrongly typed values raise :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict:
    """A dataclass as plain YAML/JSON-able data (tuples become lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(obj)


def load_yaml(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read a YAML file (``None``: the defaults) into dataclass ``cls``, then apply ``overrides``
    (``"train.iterations=800"``, ``"inpaint.enabled=false"``: dotted keys, YAML values); a missing/unparsable file,
    malformed override or invalid value is a ConfigError."""
    where = "config"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size} bytes: too large for a config (at most {MAX_CONFIG_BYTES})")
        try:
            data = _parse(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0][:160]})") from None
        except (UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{p}: not a YAML text file ({type(e).__name__})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a config is a mapping of sections (train:, cyclegan:, ...), not "
                              f"{type(data).__name__}")
    else:
        data = to_dict(cls())
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {_short(item)}: expected KEY=VALUE, e.g. train.iterations=800")
        try:
            value = _parse(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {_short(item)}: value is not valid YAML") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {_short(item)}: {part} is not a section")
        node[parts[-1]] = value
    return from_dict(cls, data, where=where)


def save_yaml(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
