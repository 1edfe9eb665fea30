"""Fixtures for the model tests."""

from __future__ import annotations

import pytest

from .helpers import MODEL_NAMES


@pytest.fixture(params=MODEL_NAMES)
def model_name(request: pytest.FixtureRequest) -> str:
    """Every ``conf/model/*.yaml``."""
    return request.param
