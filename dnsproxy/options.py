"""Turning a TOML table into a plugin's frozen options object, with errors that say where.

A plugin declares its options as an ``attrs.frozen`` class; field names are the keys, the
annotations are checked, converters normalise (see `duration`, `names`), and validators
reject. Every problem becomes one line: ``config.toml: chain[2] (blocklist): ...``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

import attrs

from dnsproxy.errors import ConfigError

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


def duration(value: object) -> float:
    """Seconds from a number or a string like "500ms", "30s", "15m", "24h", "7d"."""
    if isinstance(value, bool):
        raise TypeError('expected a duration such as 30, "30s" or "24h"')
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f'expected a duration such as 30, "30s" or "24h", got {value!r}')


def string_tuple(value: object) -> tuple[str, ...]:
    """A list of strings (a single string is accepted as a list of one).

    Converters here are idempotent: `build` runs them once per key to attribute errors,
    then attrs runs them again when the object is made.
    """
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError("expected a list of strings")


def networks(value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A list of networks ("10.0.0.0/8", "::1", "192.168.1.50/32")."""
    if isinstance(value, tuple) and all(
        isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network) for v in value
    ):
        return value
    out = []
    for item in string_tuple(value):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not an IP network") from exc
    return tuple(out)


def seconds(default: float | str, low: float, high: float) -> Any:
    """An attrs field for a duration option: converted by `duration`, bounded low..high."""
    return attrs.field(default=default, converter=duration, validator=in_range(low, high))


def in_range(low: float, high: float) -> Any:
    """attrs validator: low <= value <= high (bounds written out in full: 10000000, not
    1e+07, so the user can copy them)."""

    def check(_inst: object, attribute: attrs.Attribute, value: float) -> None:
        if not low <= value <= high:
            raise ValueError(f"must be between {_number(low)} and {_number(high)}, got {value!r}")

    return check


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _type_ok(value: object, annotation: object) -> bool:
    if annotation is Any or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(map(_type_ok, value, args)))
    if origin in (dict, Mapping):
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation: object) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin in (tuple, list):
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        annotation,
        getattr(annotation, "__name__", str(annotation)),  # type: ignore[arg-type]
    )


def suggest(key: str, known: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" for a near miss, else ""."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build(cls: type[T], table: Mapping[str, Any], where: str, what: str = "option") -> T:
    """Validate ``table`` against the attrs class ``cls`` and build it.

    Raises ConfigError listing every problem, one line each.
    """
    fields = {f.name: f for f in attrs.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    errors = []
    kwargs = {}
    for key, value in table.items():
        field = fields.get(key)
        if field is None or not field.init:
            errors.append(f"{where}: unknown {what} {key!r}{suggest(key, fields)}")
            continue
        if field.converter is None and not _type_ok(value, hints.get(key, Any)):
            errors.append(
                f"{where}: {what} {key!r} must be {_type_name(hints[key])}, got {value!r}"
            )
            continue
        try:
            if field.converter is not None:
                value = field.converter(value)  # type: ignore[operator]
            if field.validator is not None:
                field.validator(None, field, value)  # per key, so the error names it
        except (TypeError, ValueError) as exc:
            errors.append(f"{where}: {what} {key!r}: {exc}")
            continue
        kwargs[key] = value
    missing = [
        name
        for name, f in fields.items()
        if f.init and f.default is attrs.NOTHING and name not in table
    ]
    errors.extend(f"{where}: missing required {what} {name!r}" for name in missing)
    if errors:
        raise ConfigError(errors)
    try:
        # Converters are idempotent, so running them again in __init__ is harmless.
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        key = _key_of(exc, fields)
        raise ConfigError(f"{where}: {what} {key!r}: {exc}" if key else f"{where}: {exc}") from exc


def _key_of(exc: Exception, fields: Mapping[str, attrs.Attribute]) -> str | None:
    for arg in exc.args:
        name = getattr(arg, "name", None)
        if isinstance(name, str) and name in fields:
            return name
    text = str(exc)
    for name in fields:
        if f"'{name}'" in text:
            return name
    return None
