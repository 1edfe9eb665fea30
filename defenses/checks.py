"""Small value checks the defenses share for their ``validate``/constructor errors."""

from __future__ import annotations

import math

from benchmark.errors import ConfigError


def is_int(value: object) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def as_number(value: object) -> float:
    """``value`` as a float, NaN for anything that is not a number (so every check fails)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def require(ok: bool, key: str, what: str, value: object) -> None:
    """Raise ``ConfigError("defense.<key>", "must be <what>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"defense.{key}", f"must be {what}, got {value!r}")


def integer(value: object, key: str, low: int = 1) -> None:
    """An ``int`` (not a ``bool``) ``>= low``: ``defense.<key>: must be an integer >= <low>``."""
    require(is_int(value) and value >= low, key, f"an integer >= {low}", value)


def number(
    value: object,
    key: str,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A number (not a ``bool``) in the range from ``low`` to ``high`` (open ends on request).

    The message names the range: ``a number > 0``, ``a number in (0, 1]``, ``a number``.
    """
    require(
        in_range(value, low, high, low_open=low_open, high_open=high_open),
        key,
        "a number" + _range_text(low, high, low_open, high_open),
        value,
    )


def null_or_number(
    value: object,
    key: str,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``None`` or a number in the range (as ``number``): ``must be null or a number ...``."""
    ok = value is None or in_range(value, low, high, low_open=low_open, high_open=high_open)
    require(ok, key, "null or a number" + _range_text(low, high, low_open, high_open), value)


def one_of(value: object, key: str, choices: tuple) -> None:
    """One of ``choices``: ``defense.<key>: must be one of (...), got ...``."""
    require(value in choices, key, f"one of {choices}", value)


def boolean(value: object, key: str) -> None:
    """``True`` or ``False``: ``defense.<key>: must be true or false, got ...``."""
    require(isinstance(value, bool), key, "true or false", value)


def in_range(
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> bool:
    """True for a number (not a ``bool``, not NaN) in the range."""
    v = as_number(value)
    above = v > low if low_open else v >= low
    below = v < high if high_open else v <= high
    return above and below


def _range_text(low: float, high: float, low_open: bool, high_open: bool) -> str:
    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    if low == -math.inf and high == math.inf:
        return ""
    if high == math.inf:
        return f" {'>' if low_open else '>='} {fmt(low)}"
    if low == -math.inf:
        return f" {'<' if high_open else '<='} {fmt(high)}"
    return f" in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
