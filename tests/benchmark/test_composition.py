"""benchmark/composition.py: Hydra's composition errors as one line naming the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigKeyError

from benchmark.composition import guard, one_line


def test_missing_option_lists_the_options_and_the_close_ones() -> None:
    err = MissingConfigException(
        "Could not find 'attack/badnet'", "attack/badnet", ["wanet", "badnets"]
    )
    line = one_line(err)
    assert line.startswith("Error: attack=badnet: no such option of attack")
    assert "choose one of badnets, wanet" in line and line.endswith("close: badnets, wanet")


def test_unknown_key_names_the_key_and_the_way_to_add_one() -> None:
    err = ConfigCompositionException(
        "Could not override 'model.kwargs.num_classes'.\nTo append to your config use +model..."
    )
    err.__cause__ = ConfigKeyError("Key 'kwargs' is not in struct\n    full_key: model.kwargs")
    line = one_line(err)
    assert line.startswith("Error: model.kwargs.num_classes: no such key")
    assert "(Key 'kwargs' is not in struct)" in line and "+model.kwargs.num_classes=" in line
    assert "\n" not in line


def test_parse_error_names_the_key() -> None:
    err = OverrideParseException("seed=[", "no viable alternative at input '['\nSee https://x")
    line = one_line(err)
    assert line.startswith("Error: seed: cannot parse the override 'seed=['")
    assert "no viable alternative" in line and "https" not in line


def test_other_composition_errors_keep_every_line_on_one() -> None:
    err = ConfigCompositionException("Could not append to config.\nEither remove + prefix")
    assert one_line(err) == "Error: Could not append to config.; Either remove + prefix"


def test_guard_exits_2_on_composition_errors_only(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def bad() -> None:
        raise MissingConfigException("x", "attack/nope", ["badnets"])

    with pytest.raises(SystemExit) as stop:
        guard(bad)()
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().startswith("Error: attack=nope")

    def bug() -> None:
        raise RuntimeError("a bug keeps its traceback")

    with pytest.raises(RuntimeError):
        guard(bug)()
    assert guard(lambda: 7)() == 7
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(MissingConfigException):
        guard(bad)()
