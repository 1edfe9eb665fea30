"""tests/conftest.py's pytest-xdist scheduling: the files it spreads test by test share no fixture
that a worker would then build twice."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import SPREAD

ROOT = Path(__file__).resolve().parents[1]
# A module, package or session fixture, by name (e.g. test_ft.py's works_cache).
FIXTURE = re.compile(
    r'@pytest\.fixture\([^)]*scope="(?:module|session|package)"[^)]*\)\s*\ndef (\w+)'
)


def test_spread_files_exist_and_define_no_module_or_session_fixture() -> None:
    for name in SPREAD:
        assert "scope=" not in (ROOT / name).read_text(), name


def test_spread_files_take_no_module_or_session_fixture_of_another_file() -> None:
    shared = {
        m.group(1)
        for path in (ROOT / "tests").rglob("*.py")
        for m in FIXTURE.finditer(path.read_text())
    }
    assert {"works_cache", "_isolated_env"} <= shared  # the pattern finds them
    shared.discard("_isolated_env")  # autouse, an environment, nothing trained
    for name in SPREAD:
        tree = ast.parse((ROOT / name).read_text())
        args = {
            a.arg
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef)
            for a in node.args.args + node.args.kwonlyargs
        }
        assert not args & shared, f"{name} uses {sorted(args & shared)}"
