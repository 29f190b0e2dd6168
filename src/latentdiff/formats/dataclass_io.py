"""Config dataclasses to and from plain dicts (JSON, YAML): strict keys, checked types, one place.

Every component's config (UNet, autoencoder, data, loss, classifier) mixes in :class:`ConfigMixin`,
so a typo in a key or a wrong type is refused the same way everywhere, naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar

from latentdiff.errors import UserError


class ConfigMixin:
    """``to_dict`` (JSON-safe, tuples as lists) and strict ``from_dict`` for a config dataclass."""

    section: ClassVar[str] = "config"  # the name errors use, e.g. "unet" in "unet.num_heads: ..."

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of all fields."""
        return to_plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Any) -> Any:
        """Build from a dict; unknown keys and wrong types raise UserError naming them."""
        return build_dataclass(cls, d, cls.section)


def build_dataclass(cls: type, d: Any, section: str) -> Any:
    """Instantiate dataclass ``cls`` from ``d`` with strict keys and checked (lightly coerced) types."""
    if not isinstance(d, dict):
        raise UserError(f"{section}: expected a mapping of settings, got {d!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    hints = {k: v for k, v in typing.get_type_hints(cls).items() if k in names}  # no ClassVars
    unknown = sorted(set(d) - set(hints))
    if unknown:
        raise UserError(f"{section}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(hints)}")
    return cls(**{k: check_type(v, hints[k], f"{section}.{k}") for k, v in d.items()})


def check_type(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (int, float, bool, str, tuple[int, ...], Optional)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:  # e.g. int | str: the first that takes the value
            try:
                return check_type(value, alternative, key)
            except UserError:
                pass
        return check_type(value, inner[-1], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return tuple(check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
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
            return float(value) if isinstance(value, str) else _fail(value, tp, key)
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
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    return x
