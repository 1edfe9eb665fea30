"""The grids are derived from the config groups (benchmark/grid.py): a yaml added to a copy of
``conf/`` joins every full grid with no other edit, config-only variants included, and the
registry-wide rules accept such a variant."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from benchmark import grid
from tests.registry import CONF, assert_registered, load_entry, options
from tests.test_experiments import covers, pairs, sweep_params

# A config-only variant of each kind: another entry's class with other settings.
DEFENSE_VARIANT = "# MMAC, ten epochs.\ndefaults:\n  - mmac\n  - _self_\nepochs: 10\n"
ATTACK_VARIANT = "# BadNets with a 5x5 square.\ndefaults:\n  - badnets\n  - _self_\nsize: 5\n"


@pytest.fixture
def conf_copy(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "defense" / "mmac_tight.yaml").write_text(DEFENSE_VARIANT)
    (conf / "attack" / "badnets_big.yaml").write_text(ATTACK_VARIANT)
    return conf


def compose_in(conf: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def test_a_yaml_added_to_the_groups_joins_every_grid(conf_copy: Path) -> None:
    attacks, defenses = set(options("attack", conf_copy)), set(options("defense", conf_copy))
    assert {"badnets_big", "mmac_tight"} <= attacks | defenses
    covers(pairs("smoke_all", str(conf_copy)), attacks, defenses, str(conf_copy))
    full = sweep_params("smoke_full", str(conf_copy))
    assert set(full["attack"]) == attacks and set(full["defense"]) == defenses
    bb = sweep_params("backdoorbench_cifar10", str(conf_copy))
    assert "mmac_tight" in bb["defense"] and bb["defense"][0] == "undefended"
    cpu = set(pairs("cifar10_cpu", str(conf_copy)))
    assert {("badnets_big", "undefended"), ("badnets", "mmac_tight")} <= cpu
    # The real conf/ is untouched by the copy.
    assert "mmac_tight" not in sweep_params("smoke_full")["defense"]


def test_a_generated_cell_of_the_copy_composes_its_variants(conf_copy: Path) -> None:
    cells = sweep_params("smoke_all", str(conf_copy))["cell"]  # registers the new cells
    name = next(c for c in cells if c.startswith("badnets_big__"))
    cfg = compose_in(conf_copy, [f"cell={name}", "debug=smoke"])
    assert cfg.attack.size == 5 and cfg.attack._target_ == "attacks.badnets.BadNets"
    cfg = compose_in(conf_copy, ["cell=badnets__mmac_tight", "debug=smoke"])
    assert cfg.defense.epochs == 10 and cfg.defense._target_ == "defenses.mmac.MMAC"


def test_a_config_only_variant_passes_the_registry_rules(conf_copy: Path) -> None:
    for group, package, name in (
        ("defense", "defenses", "mmac_tight"),
        ("attack", "attacks", "badnets_big"),
    ):
        composed = compose_in(conf_copy, [f"{group}={name}"])[group]
        loaded = load_entry(group, name, conf_copy)  # what the contract tests build from
        assert OmegaConf.to_container(loaded) == OmegaConf.to_container(composed)
        obj = instantiate(composed)
        assert_registered(obj, name, package, options(group, conf_copy))
    with pytest.raises(AssertionError):  # a class registered under no entry's name is not
        assert_registered(obj, "other", "attacks", ["other"])


def test_families_come_from_the_defense_classes_stage() -> None:
    names = grid.options("defense")
    fams = grid.families(names)
    family_of = {d: fam for fam, members in fams.items() for d in members}
    assert set(family_of) == set(names) - {"undefended"}  # every defense but the baseline
    for d, fam in family_of.items():  # the family is the class's stage, read from its entry
        assert fam == str(get_class(load_entry("defense", d)._target_).stage), d
    assert {"NONE", "ultraclean"} <= set(fams["in_training"])
    assert {"linf_prune", "mmac", "mmbm", "ulrl"} <= set(fams["post_training"])


def test_exclusions_are_named_and_must_exist() -> None:
    assert "NONE" not in grid.options("defense", ["NONE"])
    assert grid.options("defense")[0] == "undefended"
    with pytest.raises(ValueError, match="not options"):
        grid.options("defense", ["renamed_away"])
    node = OmegaConf.create(
        {
            "d": "${bench_options:defense,[NONE,ulrl]}",
            "s": "${bench_options:attack_setting/backdoorbench}",
            "c": "${bench_cells:covering,[natural]}",
        }
    )
    assert "NONE" not in node.d.split(",") and "ulrl" not in node.d.split(",")
    assert node.s.split(",")[0] == "backdoorbench/badnets"
    assert all(not c.startswith("natural__") for c in node.c.split(","))


def test_covering_grows_with_attacks_plus_defenses(tmp_path: Path) -> None:
    """With many methods the covering set stays A + (D - 1) + (A - 1) x F, far below A x D."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    a0, d0 = len(options("attack", conf)), len(options("defense", conf))
    for i in range(9):
        (conf / "attack" / f"blend_v{i}.yaml").write_text("defaults:\n  - blend\n  - _self_\n")
        (conf / "defense" / f"NONE_v{i}.yaml").write_text("defaults:\n  - NONE\n  - _self_\n")
        (conf / "defense" / f"mmbm_v{i}.yaml").write_text("defaults:\n  - mmbm\n  - _self_\n")
    attacks, defenses = set(options("attack", conf)), set(options("defense", conf))
    a, d = len(attacks), len(defenses)
    assert (a, d) == (a0 + 9, d0 + 18)
    f = len(grid.families(sorted(defenses), grid.package_loader(conf)))
    got = pairs("smoke_all", str(conf))
    covers(got, attacks, defenses, str(conf))
    assert len(got) == a + (d - 1) + (a - 1) * f < a * d
