"""The shared value checks: their messages, what counts as an integer or a number, the ranges."""

from __future__ import annotations

import math

import pytest

from benchmark.checks import Checks, as_number, in_range, is_int
from benchmark.errors import ConfigError

checks = Checks("group")


def message(call, *args: object, **kwargs: object) -> str:
    """The error ``call(*args, **kwargs)`` raises, as printed."""
    with pytest.raises(ConfigError) as err:
        call(*args, **kwargs)
    return str(err.value)


def test_bools_are_neither_integers_nor_numbers() -> None:
    assert is_int(0) and is_int(-3)
    assert not any(is_int(v) for v in (True, False, 1.0, "1", None))
    assert as_number(2) == 2.0 and as_number(0.5) == 0.5
    assert all(math.isnan(as_number(v)) for v in (True, False, "0.5", None, [1]))
    assert message(checks.integer, True, "n") == "group.n: must be an integer >= 1, got True"
    assert message(checks.number, False, "x") == "group.x: must be a number, got False"
    assert message(checks.boolean, 1, "flag") == "group.flag: must be true or false, got 1"
    checks.boolean(False, "flag")


def test_integer_names_its_lower_bound() -> None:
    checks.integer(1, "n")
    checks.integer(0, "n", 0)
    assert message(checks.integer, 0, "n") == "group.n: must be an integer >= 1, got 0"
    assert message(checks.integer, -1, "n", 0) == "group.n: must be an integer >= 0, got -1"
    assert message(checks.integer, 2.0, "n") == "group.n: must be an integer >= 1, got 2.0"


@pytest.mark.parametrize(
    ("low", "high", "low_open", "high_open", "inside", "outside", "text"),
    [
        (-math.inf, math.inf, False, False, [-1e9, 0, math.inf], [math.nan, "1"], "a number"),
        (0.0, math.inf, True, False, [1e-12, 3, math.inf], [0, -1], "a number > 0"),
        (0.0, math.inf, False, False, [0, 0.0], [-1e-12], "a number >= 0"),
        (-math.inf, 1.0, False, True, [0.999, -5], [1, 1.0], "a number < 1"),
        (-math.inf, 1.0, False, False, [1, -math.inf], [1.5], "a number <= 1"),
        (0.0, 1.0, True, False, [1, 1.0, 0.5], [0, 1.01], "a number in (0, 1]"),
        (0.0, 1.0, False, True, [0, 0.5], [1, -0.1], "a number in [0, 1)"),
        (0.0, 1.0, True, True, [0.5], [0, 1], "a number in (0, 1)"),
        (0.0, 0.5, False, False, [0, 0.5], [0.51], "a number in [0, 0.5]"),
        (0.0, 255.0, True, False, [255, 40], [256, math.inf], "a number in (0, 255]"),
    ],
)
def test_number_ranges_with_open_and_closed_ends(
    low: float,
    high: float,
    low_open: bool,
    high_open: bool,
    inside: list[object],
    outside: list[object],
    text: str,
) -> None:
    ends = {"low_open": low_open, "high_open": high_open}
    for value in inside:
        assert in_range(value, low, high, **ends), value
        checks.number(value, "x", low, high, **ends)
        checks.null_or_number(value, "x", low, high, **ends)
    for value in [*outside, math.nan, True]:
        assert not in_range(value, low, high, **ends), value
        expected = f"group.x: must be {text}, got {value!r}"
        assert message(checks.number, value, "x", low, high, **ends) == expected
    checks.null_or_number(None, "x", low, high, **ends)
    null_text = text.replace("a number", "null or a number")
    assert message(checks.null_or_number, "x", "x", low, high, **ends) == (
        f"group.x: must be {null_text}, got 'x'"
    )


def test_one_of_and_require_word_the_message() -> None:
    checks.one_of("a", "mode", ("a", "b"))
    assert message(checks.one_of, "c", "mode", ("a", "b")) == (
        "group.mode: must be one of ('a', 'b'), got 'c'"
    )
    checks.require(True, "k", "anything", 0)
    assert message(checks.require, False, "k", "an odd integer", 4) == (
        "group.k: must be an odd integer, got 4"
    )


def test_the_prefix_names_the_config_group() -> None:
    assert Checks("attack").key("size") == "attack.size"
    assert Checks("").key("seed") == "seed"
    with pytest.raises(ConfigError) as err:
        Checks("defense").integer(0, "epochs")
    assert err.value.key == "defense.epochs"
    assert str(err.value) == "defense.epochs: must be an integer >= 1, got 0"
    with pytest.raises(ConfigError) as err:
        Checks("").boolean("yes", "resume")
    assert err.value.key == "resume"
    assert Checks("attack").is_int is is_int  # the helpers are reachable from the object
