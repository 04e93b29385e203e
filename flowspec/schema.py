"""Typed config sections and the generic loader behind them (no section definitions here).

Theory of operation
-------------------
A config is a tree of frozen dataclasses deriving from `Section`, whose `__post_init__` first
*normalizes* each field against its type hint (int to float for float fields, str to StrEnum,
list to tuple, mapping to nested section) and then runs the section's own checks (`_check`). So a
config is valid however it was made: from YAML, from `from_dict`, or by hand in Python.

Rules:
1. Every user-facing failure is a `ScenarioError` that names the dotted key (`tree.topk`,
   `links.0.bandwidth_mbps`). A section raises with keys relative to itself; each enclosing level
   puts its own key in front on the way out, and `from_dict` puts the source (file name) first.
2. The loader is generic over field types: bool, int, float, str, StrEnum, `X | None`,
   `tuple[X, ...]` and nested sections. A new section needs fields and checks, not loader code;
   any other field type is a programming error (TypeError), not a user error.
3. Overrides (`dotted.key=value`) are checked against the schema, not against the data, so a
   section that a file leaves out can still be overridden.
"""

from __future__ import annotations

import copy
import math
import numbers
import reprlib
import types
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from enum import Enum, StrEnum
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

_UNKNOWN = "unknown key "


class ScenarioError(ValueError):
    """A scenario (file, mapping, override or constructor call) is invalid; the text says where.

    `key_at` is the offset of the dotted key in the text, so that an enclosing section can put its
    own key in front: TreeConfig's "topk must be >= 1, got 0" becomes "tree.topk must be ...".
    """

    def __init__(self, message: str, *, key_at: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.key_at = key_at

    def under(self, key: str) -> ScenarioError:
        """The same error seen from the section that holds this one at `key`."""
        if not key:
            return self
        i = self.key_at
        return ScenarioError(f"{self.message[:i]}{key}.{self.message[i:]}", key_at=i)

    def within(self, source: str) -> ScenarioError:
        """The same error, prefixed with where it came from (a file name, usually)."""
        lead = f"{source}: "
        return ScenarioError(lead + self.message, key_at=len(lead) + self.key_at)


class Section:
    """Base of every config dataclass: normalize fields to their hints, then `_check` ranges."""

    __slots__ = ()

    def __post_init__(self) -> None:
        for name, hint in _field_hints(type(self)).items():
            value = getattr(self, name)
            normalized = _coerce(value, hint, name)
            if normalized is not value:
                object.__setattr__(self, name, normalized)  # frozen: the only way to normalize
        self._check()

    def _check(self) -> None:
        """Range and cross-field checks; by now every field has its declared type."""


_HINTS: dict[type, dict[str, Any]] = {}


def _field_hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint, cached: every construction of a section asks."""
    if cls not in _HINTS:
        hints = get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in fields(cls)}
    return _HINTS[cls]


def _show(value: Any) -> str:
    return reprlib.repr(value)  # bounded: a stray YAML list must not flood the message


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and is_dataclass(hint)


def _strip_optional(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        arms = [a for a in get_args(hint) if a is not types.NoneType]
        assert len(arms) == 1, f"only `X | None` unions are supported, got {hint}"
        return arms[0]
    return hint


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` converted to `hint`, or a ScenarioError naming `key`. Identity when already right."""
    if get_origin(hint) in (Union, types.UnionType):
        return None if value is None else _coerce(value, _strip_optional(hint), key)
    if get_origin(hint) is tuple:
        item, ellipsis = get_args(hint)
        assert ellipsis is Ellipsis, f"only tuple[X, ...] is supported, got {hint}"
        if not isinstance(value, (list, tuple)):
            raise ScenarioError(f"{key} must be a list, got {_show(value)}")
        return tuple(_coerce(v, item, f"{key}.{i}") for i, v in enumerate(value))
    if _is_section(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ScenarioError(f"{key} must be a mapping, got {_show(value)}")
        return _build(hint, value, key)
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        allowed = sorted(m.value for m in hint)
        if isinstance(value, str) and value in allowed:
            return value if isinstance(value, hint) else hint(value)
        raise ScenarioError(f"{key} must be one of {', '.join(allowed)}, got {_show(value)}")
    # bool is a subclass of int in Python; in a scenario `true` is never a count and 1 never a flag.
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ScenarioError(f"{key} must be true or false, got {_show(value)}")
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)  # the same object for a plain int; numpy ints become int
        raise ScenarioError(f"{key} must be an integer, got {_show(value)}")
    if hint is float:
        # Every float of a scenario is a measure (a rate, a time, a temperature): .inf and .nan are
        # typos or overflow, never a setting, and would fail deep inside a run instead of here.
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ScenarioError(f"{key} must be a finite number, got {_show(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ScenarioError(f"{key} must be a string, got {_show(value)}")
    raise TypeError(f"config field {key!r} has an unsupported type {hint!r}")


def _build(cls: type[T], data: Mapping[Any, Any], key: str) -> T:
    """An instance of section `cls` from `data`, with errors keyed relative to the caller."""
    known = _field_hints(cls)
    for name in data:
        if name not in known:
            path = f"{key}.{name}" if key else str(name)
            raise ScenarioError(f"{_UNKNOWN}{path} (known: {', '.join(sorted(known))})", key_at=len(_UNKNOWN))
    try:
        return cls(**data)
    except ScenarioError as e:
        raise e.under(key) from None


def from_dict(cls: type[T], data: Any, source: str = "<dict>") -> T:
    """Build section `cls` from a plain mapping; errors start with `source`.

    >>> from flowspec.config import TreeConfig
    >>> from_dict(TreeConfig, {"topk": 4, "segment_size": 8}).topk
    4
    """
    if not isinstance(data, Mapping):
        raise ScenarioError(f"{source}: top level must be a mapping, got {_show(data)}")
    try:
        return _build(cls, data, "")
    except ScenarioError as e:
        raise e.within(source) from None


def to_dict(section: Any) -> dict[str, Any]:
    """Plain, YAML-able form of a section: enums as strings, tuples as lists."""
    return {f.name: _plain(getattr(section, f.name)) for f in fields(section)}


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return to_dict(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def apply_overrides(
    data: Mapping[str, Any],
    overrides: Sequence[str],
    source: str,
    schema: type,
) -> dict[str, Any]:
    """A copy of `data` with each `dotted.key=value` override applied, the value parsed as YAML.

    Keys are checked against `schema`, not against `data`, so a section the file omits can still be
    overridden. Values are only parsed here; the dataclasses validate them afterwards.

    >>> from flowspec.config import Scenario
    >>> apply_overrides({"tree": {"topk": 4}}, ["tree.topk=8", "policy=chunk-pp"], "x.yaml", Scenario)
    {'tree': {'topk': 8}, 'policy': 'chunk-pp'}
    """
    result = copy.deepcopy(dict(data))
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ScenarioError(f"{source}: override {override!r} must look like key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ScenarioError(f"{source}: override {override}: value is not valid YAML") from None
        try:
            _set_path(result, key.strip().split("."), value, schema)
        except ScenarioError as e:
            raise e.within(f"{source}: override {override}") from None
    return result


def _set_path(data: dict[str, Any], parts: list[str], value: Any, schema: type) -> None:
    node: Any = data
    hint: Any = schema
    for i, part in enumerate(parts):
        path, parent = ".".join(parts[: i + 1]), ".".join(parts[:i])
        hint = _strip_optional(hint)
        slot: str | int
        if _is_section(hint):
            known = _field_hints(hint)
            if part not in known:
                raise ScenarioError(f"{_UNKNOWN}{path} (known: {', '.join(sorted(known))})", key_at=len(_UNKNOWN))
            slot, hint = part, known[part]
        elif get_origin(hint) is tuple:
            if not part.isdigit():
                raise ScenarioError(f"{_UNKNOWN}{path} ({parent} is a list: use an index)", key_at=len(_UNKNOWN))
            slot, hint = int(part), get_args(hint)[0]
            if slot >= len(node):
                raise ScenarioError(f"{path} is out of range ({parent} has {len(node)} entries)")
        else:
            raise ScenarioError(f"{_UNKNOWN}{path} ({parent} has no sub-keys)", key_at=len(_UNKNOWN))
        if i == len(parts) - 1:
            node[slot] = value
            return
        child = node.get(slot) if isinstance(node, dict) else node[slot]
        inner = _strip_optional(hint)
        if get_origin(inner) is tuple:
            child = [] if child is None else child
            if not isinstance(child, list):
                raise ScenarioError(f"{path} must be a list, got {_show(child)}")
        elif _is_section(inner):
            child = {} if child is None else child
            if not isinstance(child, dict):
                raise ScenarioError(f"{path} must be a mapping, got {_show(child)}")
        node[slot] = child
        node = child


def at_most(section: Section, name: str, maximum: int | float, why: str) -> None:
    """`section.name` <= `maximum`, or a ScenarioError naming the field and `why` the bound exists."""
    value = getattr(section, name)
    if value > maximum:
        raise ScenarioError(f"{name} must be <= {maximum} ({why}), got {value!r}")


def at_least(section: Section, name: str, minimum: int | float) -> None:
    """`section.name` >= `minimum`, or a ScenarioError naming the field (prefixed by the caller's path)."""
    value = getattr(section, name)
    if value < minimum:
        raise ScenarioError(f"{name} must be >= {minimum}, got {value!r}")
