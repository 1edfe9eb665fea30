"""The value checks every config group shares for its ``ConfigError``s.

One ``Checks`` per group names its keys: ``checks = Checks("attack")``, then
``checks.integer(size, "size")`` raises ``ConfigError("attack.size", "must be an integer >= 1,
got 0")``. Numbers are ``int`` or ``float``, never ``bool``; NaN fails every range.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from benchmark.errors import ConfigError


def is_int(value: object) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def as_number(value: object) -> float:
    """``value`` as a float, NaN for anything that is not a number (so every check fails)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


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


class Checks:
    """Checks whose errors name ``<prefix>.<key>`` (just ``<key>`` for an empty prefix).

    Every message reads ``must be <what>, got <value>``.
    """

    is_int = staticmethod(is_int)
    as_number = staticmethod(as_number)
    in_range = staticmethod(in_range)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def key(self, key: str) -> str:
        """The full dotted key of ``key``."""
        return f"{self.prefix}.{key}" if self.prefix else key

    def require(self, ok: bool, key: str, what: str, value: object) -> None:
        """Raise ``ConfigError("<prefix>.<key>", "must be <what>, got <value>")`` unless ``ok``."""
        if not ok:
            raise ConfigError(self.key(key), f"must be {what}, got {value!r}")

    def integer(self, value: object, key: str, low: int = 1) -> None:
        """An ``int`` (not a ``bool``) ``>= low``: ``must be an integer >= <low>``."""
        self.require(is_int(value) and value >= low, key, f"an integer >= {low}", value)

    def number(
        self,
        value: object,
        key: str,
        low: float = -math.inf,
        high: float = math.inf,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        """A number (not a ``bool``) from ``low`` to ``high`` (open ends on request).

        The message names the range: ``a number > 0``, ``a number in (0, 1]``, ``a number``.
        """
        self.require(
            in_range(value, low, high, low_open=low_open, high_open=high_open),
            key,
            "a number" + _range_text(low, high, low_open, high_open),
            value,
        )

    def null_or_number(
        self,
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
        what = "null or a number" + _range_text(low, high, low_open, high_open)
        self.require(ok, key, what, value)

    def one_of(self, value: object, key: str, choices: Collection[object]) -> None:
        """One of ``choices``: ``must be one of (...), got ...``."""
        self.require(value in choices, key, f"one of {choices}", value)

    def boolean(self, value: object, key: str) -> None:
        """``True`` or ``False``: ``must be true or false, got ...``."""
        self.require(isinstance(value, bool), key, "true or false", value)


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
