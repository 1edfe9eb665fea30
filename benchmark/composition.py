"""Hydra's composition errors as the harness's other input errors: one line, exit status 2.

Hydra reports an unknown option (``attack=badnet``), an unknown key (``model.foo=1``) or an
override it cannot parse (``seed=[``) itself, before any job runs: several lines (the option
list, the config search path, a hint about ``HYDRA_FULL_ERROR``) and exit status 1, which a
script cannot tell from a failed sweep (also 1, ``benchmark.callbacks``). :func:`install`
wraps Hydra's reporter so that these errors print one ``Error: <key>: ...`` line, with the
options and the close matches of a misspelt name, and exit with status 2, as
``benchmark.errors.ConfigError`` does. A multirun composes every job's config before the
first starts (Hydra's ``validate_batch_is_legal``), so a bad value anywhere in a sweep stops it
before any training. ``HYDRA_FULL_ERROR=1`` keeps Hydra's own report (with the traceback).
Errors raised while a job runs (instantiation included) are not touched. The wrapped reporter
is Hydra's private ``hydra._internal.utils.run_and_report`` (hydra-core is pinned to 1.3.x in
``pyproject.toml``; ``tests/benchmark/test_bad_inputs.py`` fails if it moves).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

from benchmark.validate import close_matches

INPUT_ERRORS = (OverrideParseException, ConfigCompositionException)


def _lines(text: object) -> list[str]:
    """The non-empty lines of ``text``, stripped, without Hydra's "See https://..." hint."""
    lines = (line.strip() for line in str(text).splitlines())
    return [line for line in lines if line and not line.startswith("See https")]


def _first_line(text: object) -> str:
    return next(iter(_lines(text)), "")


def one_line(err: Exception) -> str:
    """The ``Error: ...`` line for a Hydra composition error, naming the key or option."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        options = sorted(str(o) for o in err.options)
        if group:
            return (
                f"Error: {group}={name}: no such option of {group}; choose one of "
                f"{', '.join(options)}{close_matches(name, options)}"
            )
    if isinstance(err, OverrideParseException):
        key = err.override.partition("=")[0].lstrip("+~") or err.override
        reason = _first_line(err.message) or "not in Hydra's override grammar"
        return (
            f"Error: {key}: cannot parse the override {err.override!r} ({reason}); quote "
            f"values with brackets or commas, e.g. '{key}=[1,2]' (hydra.cc: override grammar)"
        )
    cause = _first_line(err.__cause__) if err.__cause__ is not None else ""
    unknown = re.match(r"Could not override '([^']+)'", str(err))
    if unknown:
        key = unknown.group(1)
        return (
            f"Error: {key}: no such key in the config ({cause or 'not in struct'}); check its "
            f"spelling (python -m benchmark.run --cfg job lists the keys), or write +{key}=... "
            f"to add a new one"
        )
    text = "; ".join(_lines(err))
    return f"Error: {text}" + (f" ({cause})" if cause and cause not in text else "")


def guard(func: Callable[[], Any]) -> Callable[[], Any]:
    """``func`` with Hydra's composition errors turned into one line and exit status 2."""

    def guarded() -> Any:
        try:
            return func()
        except INPUT_ERRORS as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(one_line(err), file=sys.stderr)
            sys.exit(2)  # SystemExit is not an Exception: Hydra's reporter lets it through

    return guarded


def install() -> None:
    """Route the command line's Hydra app through :func:`guard` (idempotent)."""
    from hydra._internal import utils

    original = utils.run_and_report
    if getattr(original, "_bench_guarded", False):
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        return original(guard(func))

    run_and_report._bench_guarded = True  # type: ignore[attr-defined]
    utils.run_and_report = run_and_report
