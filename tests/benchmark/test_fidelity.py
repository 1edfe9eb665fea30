"""The reference comparison: every run cell matched on what defines the published number, or
told why not (benchmark.fidelity against results/reference/backdoorbench_cifar10.*)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from benchmark.cache import run_settings
from benchmark.collect import flatten, load_records
from benchmark.fidelity import compare, load_references, reference_rows, setting_mismatches
from tests.benchmark.records import write_record
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[2]
CIFAR = ("dataset=cifar10", "model=preact_resnet18")
HELLO_KITTY = "10f470812922a1b22d34755f491b23f2cabc6e32f236a26e48d2dddd396ae2b3"


@pytest.fixture(scope="module")
def reference():
    (ref,) = load_references(ROOT / "results" / "reference")
    return ref


def _compare(folder: Path, reference) -> pd.DataFrame:
    return compare(load_records([folder]), [reference])


def test_the_backdoorbench_setting_matches_and_is_judged_at_two_points(
    tmp_path: Path, reference
) -> None:
    bb = (*CIFAR, "attack_setting=backdoorbench/badnets")
    write_record(tmp_path / "s0", bb, 0, clean_acc=0.912, asr=0.951, ra=0.045)
    write_record(tmp_path / "s1", bb, 1, clean_acc=0.914, asr=0.949, ra=0.047)
    (row,) = _compare(tmp_path, reference).to_dict("records")
    assert row["status"] == "pass" and row["n_seeds"] == 2 and row["reasons"] == ""
    assert row["clean_acc_ref"] == pytest.approx(91.32) and row["asr_ref"] == pytest.approx(95.03)
    assert row["ra_ref"] == pytest.approx(4.67)
    assert row["clean_acc_diff"] == pytest.approx(91.3 - 91.32)
    assert "47,500" in row["notes"]  # the documented deviations travel with the row
    write_record(tmp_path / "s2", bb, 2, clean_acc=0.80, asr=0.95, ra=0.046)  # CA 11 points off
    (row,) = _compare(tmp_path, reference).to_dict("records")
    assert row["status"] == "fail" and row["n_seeds"] == 3
    rows = reference_rows(_compare(tmp_path, reference), reference)
    hit = rows[(rows["attack"] == "badnets") & (rows["defense"] == "undefended")]
    assert list(hit["verdict"]) == ["fail", "no comparable run", "no comparable run",
                                    "no comparable run", "no comparable run"]  # fmt: skip
    assert hit.iloc[0]["clean_acc_ours"] == pytest.approx(87.53, abs=0.01)


def test_smoke_runs_are_not_comparable_and_say_why(tmp_path: Path, reference) -> None:
    write_record(tmp_path / "a", (*CIFAR, "attack_setting=backdoorbench/badnets", "debug=smoke"))
    (row,) = _compare(tmp_path, reference).to_dict("records")
    assert row["status"] == "not comparable"
    for reason in (
        "training images (dataset.max_train): 600, the reference used null",
        "epochs: 1, the reference used 100",
        "batch size: 64, the reference used 128",
    ):
        assert reason in row["reasons"]


def test_blend_with_the_noise_key_is_never_paired_with_the_hello_kitty_row(
    tmp_path: Path, reference
) -> None:
    bb = (*CIFAR, "attack_setting=backdoorbench/blend")
    facts = {"poison_rate": 0.1, "poison_rate_of_train": 0.1, "formula": "convex"}
    write_record(tmp_path / "noise", bb, facts={**facts, "key": "noise", "key_sha256": None})
    kitty = (*bb, "paths.hello_kitty=/data/hello_kitty.jpeg")
    write_record(
        tmp_path / "hk", kitty, facts={**facts, "key": "hello_kitty", "key_sha256": HELLO_KITTY}
    )
    rows = {r["setting"]: r for r in _compare(tmp_path, reference).to_dict("records")}
    noise, hk = sorted(rows.values(), key=lambda r: r["status"] == "not comparable")[::-1]
    assert noise["reasons"] == "blend key: noise, the reference used hello_kitty"
    assert hk["status"] in ("pass", "fail") and hk["clean_acc_ref"] == pytest.approx(93.47)


def test_clean_label_rows_match_on_the_share_of_the_training_set(tmp_path: Path, reference) -> None:
    """Half the target class (the harness default) is BackdoorBench's 5% row; the whole class
    (BackdoorBench's pratio 0.1) its 10% row, whichever way the rate was written."""
    write_record(tmp_path / "half", (*CIFAR, "attack=sig"),
                 facts={"poison_rate": 0.5, "poison_rate_of_train": 0.05})  # fmt: skip
    write_record(tmp_path / "bb", (*CIFAR, "attack_setting=backdoorbench/sig"),
                 facts={"poison_rate": 0.1, "poison_rate_of_train": 0.1})  # fmt: skip
    rows = sorted(_compare(tmp_path, reference).to_dict("records"),
                  key=lambda r: r["poison_rate_of_train"])  # fmt: skip
    assert all(r["status"] in ("pass", "fail") for r in rows)
    assert rows[0]["clean_acc_ref"] == pytest.approx(93.64)  # 5%
    assert rows[1]["clean_acc_ref"] == pytest.approx(84.48)  # 10%: the whole class (v1 data)


def test_every_other_mismatch_is_named(tmp_path: Path, reference) -> None:
    write_record(tmp_path / "wanet", (*CIFAR, "attack=wanet"))  # the harness recipe
    write_record(
        tmp_path / "ulrl", (*CIFAR, "attack_setting=backdoorbench/badnets", "defense=ulrl")
    )
    write_record(tmp_path / "rate", (*CIFAR, "attack_setting=backdoorbench/badnets",
                                     "attack.poison_rate=0.2"))  # fmt: skip
    write_record(tmp_path / "mnist", ("attack_setting=backdoorbench/badnets",))
    reasons = {r["setting"]: r["reasons"] for r in _compare(tmp_path, reference).to_dict("records")}
    text = "\n".join(reasons.values())
    assert "lr schedule: torch.optim.lr_scheduler.CosineAnnealingLR, the reference used" in text
    assert "WaNet augmentation: harness, the reference used backdoorbench" in text
    assert "defense ulrl: no reference row" in text
    assert "poison rate 0.2 of the training set: the reference has 0.1, 0.05, 0.01" in text
    assert "dataset mnist5k: not in the reference (it has cifar10)" in text
    assert len(reasons) == 4 and all(reasons.values())


def test_command_line_defense_settings_are_an_ablation(tmp_path: Path, reference) -> None:
    write_record(tmp_path / "a", (*CIFAR, "attack_setting=backdoorbench/badnets", "+defense.x=1"))
    (row,) = _compare(tmp_path, reference).to_dict("records")
    assert "defense settings changed on the command line (defense.x=1)" in row["reasons"]


@pytest.mark.parametrize("attack", ["badnets", "blend", "sig", "label_consistent", "wanet"])
def test_the_experiment_cells_hold_every_setting_the_reference_names(
    attack: str, reference, tmp_path: Path
) -> None:
    """experiment=backdoorbench_cifar10 as configured is comparable (Blend: once the user gives
    the Hello Kitty file; its content hash is only known at run time)."""
    cfg = compose_cfg(["experiment=backdoorbench_cifar10", f"attack_setting=backdoorbench/{attack}",
                       "defense=undefended"], tmp_path)  # fmt: skip
    settings = flatten(run_settings(cfg))
    if attack == "blend":
        settings["attack.key_sha256"] = HELLO_KITTY
    assert setting_mismatches(settings, {}, reference.requirements(attack)) == []


def _leaderboard_defenses(reference) -> list[str]:
    ours = {p.stem for p in (ROOT / "conf" / "defense").glob("*.yaml")}
    return sorted(set(reference.numbers["defense"]) & ours - {"undefended"})


def test_every_leaderboard_defense_we_run_is_in_the_experiment_with_its_recipe(
    reference, tmp_path: Path
) -> None:
    """experiment=backdoorbench_cifar10 runs each defense as BackdoorBench does
    (benchmark=backdoorbench), so that every defended cell it makes is comparable."""
    defenses = _leaderboard_defenses(reference)
    files = {p.stem for p in (ROOT / "conf" / "defense_setting" / "backdoorbench").glob("*.yaml")}
    assert files == set(reference.defenses)  # a recipe file for each recipe the reference names
    assert {"ft", "fp", "nad", "nc", "anp", "clp", "i_bau", "abl", "ac", "ss"} <= set(defenses)
    for defense in defenses:
        run = ["experiment=backdoorbench_cifar10", "attack_setting=backdoorbench/badnets"]
        cfg = compose_cfg([*run, f"defense={defense}"], tmp_path)
        settings = flatten(run_settings(cfg))
        assert setting_mismatches(settings, {}, reference.requirements("badnets", defense)) == []


@pytest.mark.parametrize("defense", ["nad", "anp", "i_bau", "nc"])
def test_a_defense_recipe_the_reference_names_is_set_only_under_its_benchmark(
    defense: str, reference, tmp_path: Path
) -> None:
    """Each recipe setting of the reference differs from our default (else it says nothing),
    conf/defense_setting/backdoorbench/<defense>.yaml sets it, and only benchmark=backdoorbench
    applies that file."""
    required = reference.defenses[defense]
    ours = flatten(run_settings(compose_cfg([*CIFAR, f"defense={defense}"], tmp_path)))
    bb = flatten(run_settings(compose_cfg([*CIFAR, f"defense={defense}", "benchmark=backdoorbench"],
                                          tmp_path)))  # fmt: skip
    assert setting_mismatches(ours, {}, required) and not setting_mismatches(bb, {}, required)
    assert len(setting_mismatches(ours, {}, required)) == len(required)  # each one differs
    changed = {k for k in bb if k.startswith("defense.") and bb[k] != ours.get(k)}
    assert changed == set(required)  # the file sets exactly what the reference names


def test_a_defense_run_with_our_defaults_is_not_compared_with_backdoorbenchs_recipe(
    tmp_path: Path, reference
) -> None:
    nums = reference.numbers
    published = nums[(nums["attack"] == "badnets") & (nums["defense"] == "nad")
                     & (nums["poison_rate"] == 0.1)].iloc[0]  # fmt: skip
    metrics = {m: published[m] / 100 for m in ("clean_acc", "asr", "ra")}
    bb = (*CIFAR, "attack_setting=backdoorbench/badnets", "defense=nad")
    write_record(tmp_path / "ours", bb, **metrics)
    write_record(tmp_path / "bb", (*bb, "benchmark=backdoorbench"), **metrics)
    rows = {r["status"]: r for r in _compare(tmp_path, reference).to_dict("records")}
    assert set(rows) == {"not comparable", "pass"}
    for reason in ("NAD student lr: 0.1, the reference used 0.01",
                   "NAD student epochs: 20, the reference used 10",
                   "NAD student nesterov: True, the reference used False"):  # fmt: skip
        assert reason in rows["not comparable"]["reasons"]
    matched = rows["pass"]
    assert matched["clean_acc_ref"] == pytest.approx(published["clean_acc"])
    assert "0.0098" in matched["notes"] and "47,500" in matched["notes"]


def test_the_reference_numbers_carry_ra_and_say_which_source_they_take(reference) -> None:
    nums = reference.numbers
    ten = nums[nums["poison_rate"] == 0.1]
    assert ten[["clean_acc", "asr", "ra"]].notna().all().all()  # RA for defended rows too
    badnets_ft = ten[(ten["attack"] == "badnets") & (ten["defense"] == "ft")].iloc[0]
    assert (badnets_ft["clean_acc"], badnets_ft["asr"], badnets_ft["ra"]) == (89.96, 1.48, 89.39)
    lc5 = nums[(nums["attack"] == "label_consistent") & (nums["defense"] == "undefended")
               & (nums["poison_rate"] == 0.05)].iloc[0]  # fmt: skip
    assert (lc5["clean_acc"], lc5["asr"]) == (93.53, 99.80)  # the HTML
    assert "results.csv has 93.29 / 99.50" in lc5["note"] and "v1 page" in lc5["note"]
    sig10 = nums[(nums["attack"] == "sig") & (nums["defense"] == "undefended")
                 & (nums["poison_rate"] == 0.1)].iloc[0]  # fmt: skip
    assert sig10["clean_acc"] == 84.48 and "whole target class" in sig10["source"]
    assert set(reference.attacks) <= {p.stem for p in (ROOT / "conf" / "attack").glob("*.yaml")}
