"""Errors the harness raises for bad input, each meant to be read by a person."""

from __future__ import annotations


class BenchmarkError(Exception):
    """Base class of the harness's own, expected errors (no traceback needed)."""


class ConfigError(BenchmarkError, ValueError):
    """A config value is out of range or inconsistent; names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


class DatasetUnavailable(BenchmarkError, FileNotFoundError):
    """A dataset is missing on disk and cannot be obtained (e.g. no network)."""


class TrainingDiverged(BenchmarkError, FloatingPointError):
    """The training loss became NaN or infinite: the cell stops instead of training on."""
