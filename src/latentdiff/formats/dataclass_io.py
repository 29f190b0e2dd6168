"""Config dataclasses to and from plain dicts (JSON, YAML): strict keys, checked types, one place.

Every component's config (UNet, autoencoder, data, loss, classifier) mixes in :class:`ConfigMixin`,
so a typo in a key or a wrong type is refused the same way everywhere, naming the key.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, ClassVar

from latentdiff.errors import UserError


class ValueEnum(str, enum.Enum):
    """A choice written to files (and compared, and printed) as its value: "text", not "CondKind.TEXT"."""

    def __str__(self) -> str:
        return str(self.value)


class ConfigMixin:
    """``to_dict`` (JSON-safe, tuples as lists) and strict ``from_dict`` for a config dataclass."""

    section: ClassVar[str] = "config"  # the name errors use, e.g. "unet" in "unet.num_heads: ..."

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of all fields."""
        return to_plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Any, float_strings: bool = True) -> Any:
        """Build from a dict; unknown keys and wrong types raise UserError naming them (``float_strings``: as
        :func:`build_dataclass`; False for JSON, which has numbers)."""
        return build_dataclass(cls, d, cls.section, float_strings)


def build_dataclass(cls: type, d: Any, section: str, float_strings: bool = True, other_keys: bool = False) -> Any:
    """Instantiate dataclass ``cls`` from ``d`` with strict keys and checked (lightly coerced) types.

    ``section`` prefixes every key in errors ("unet" gives "unet.num_heads: ..."; a section ending in ":",
    such as a file name, gives "file.json: num_heads: ..."). ``float_strings``: accept "1e-4" for a float
    (PyYAML reads it as a string); JSON files written by this code never need it. ``other_keys``: ignore
    keys ``cls`` does not name (files of other programs, which hold more than we read).
    """
    if not isinstance(d, dict):
        raise UserError(f"{section.rstrip(':')}: expected a mapping of settings, got {d!r:.80}")
    names = {f.name for f in dataclasses.fields(cls)}
    hints = {k: v for k, v in typing.get_type_hints(cls).items() if k in names}  # no ClassVars
    unknown = sorted(map(str, set(d) - set(hints)))
    if unknown and not other_keys:
        raise UserError(f"{section.rstrip(':')}: unknown key(s) {', '.join(unknown)}; known: {', '.join(hints)}")
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in d
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise UserError(f"{section.rstrip(':')}: missing key(s) {', '.join(required)}")
    key = (lambda k: f"{section} {k}") if section.endswith(":") else (lambda k: f"{section}.{k}")
    return cls(**{k: check_type(v, hints[k], key(k), float_strings) for k, v in d.items() if k in hints})


def check_type(value: Any, tp: Any, key: str, float_strings: bool = True) -> Any:
    """Check ``value`` against annotation ``tp`` (int, float, bool, str, an Enum, a dataclass, tuple[X, ...],
    dict[str, X], Optional); nested dataclasses are built with :func:`build_dataclass`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:  # e.g. int | str: the first that takes the value
            try:
                return check_type(value, alternative, key, float_strings)
            except UserError:
                pass
        return check_type(value, inner[-1], key, float_strings)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return tuple(check_type(v, args[0], f"{key}[{i}]", float_strings) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key, float_strings)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r:.80}")
        if not args or args[1] is Any:
            return value
        return {k: check_type(v, args[1], f"{key}.{k}", float_strings) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [m.value for m in tp]
        if isinstance(value, str) and value in choices:
            return tp(value)
        raise UserError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # PyYAML reads 1e-4 (no dot) as a string
            return float(value) if isinstance(value, str) and float_strings else _fail(value, tp, key)
        except ValueError:
            pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    _fail(value, tp, key)


def _fail(value: Any, tp: Any, key: str) -> typing.NoReturn:
    raise UserError(f"{key}: expected {tp.__name__}, got {value!r}")


def check_choice(key: str, value: str, options: tuple[str, ...]) -> None:
    """Refuse ``value`` unless it is one of ``options``, naming the key and the choices."""
    if value not in options:
        raise UserError(f"{key}: unknown value {value!r}; choose one of {', '.join(options)}")


def check_positive(key: str, value: float) -> None:
    """Refuse a ``value`` that is not > 0, naming the key."""
    if value <= 0:
        raise UserError(f"{key} must be > 0, got {value}")


def to_plain(x: Any) -> Any:
    """JSON-safe nested values: tuples as lists, enums as their values."""
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    return x
