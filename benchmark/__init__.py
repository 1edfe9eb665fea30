"""Backdoor benchmark harness: config-driven attack -> train -> defend -> evaluate -> log."""

__version__ = "0.1.0"
