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
