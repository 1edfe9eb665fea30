"""Every experiment (conf/experiment/) is a whole table: its sweep expands to the intended cells,
its pinned setting is the paper's, and one of its cells runs end to end at smoke size.

Composition of every experiment's defaults is in test_configs.py.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf

from benchmark import grid, pipeline
from tests.conftest import CONF_DIR, compose_cfg
from tests.registry import base_entry

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
ATTACKS = {p.stem for p in (CONF / "attack").glob("*.yaml")}
DEFENSES = {p.stem for p in (CONF / "defense").glob("*.yaml")}
DIGIT_DATA = ("mnist5k", "digits")  # no CIFAR-10 offline: runs swap in these


def hydra_config(name: str, conf_dir: str = CONF_DIR) -> Any:
    """The ``hydra`` node of an experiment as composed (an experiment may build on another),
    its sweep values resolved as the sweeper does: the grids' resolvers (benchmark/grid.py)
    read the config groups of the running app, here ``conf_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
        params = dict(cfg.hydra.sweeper.params.items())  # resolved with the app's groups
    GlobalHydra.instance().clear()
    hydra = cfg.hydra
    hydra.sweeper.params = params
    return hydra


def raw_sweep_params(name: str) -> dict[str, str]:
    """``hydra.sweeper.params`` as written (resolver calls not resolved)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=False)
    return {str(k): str(v) for k, v in params.items()}


def sweep_params(name: str, conf_dir: str = CONF_DIR) -> dict[str, list[str]]:
    """``hydra.sweeper.params`` of an experiment as composed, each value split into its sweep
    choices."""
    raw = hydra_config(name, conf_dir).sweeper.params
    return {key: [v.strip() for v in str(value).split(",")] for key, value in raw.items()}


def cells(name: str) -> list[list[str]]:
    """The override lists of every job the basic sweeper launches for an experiment."""
    params = sweep_params(name)
    keys = list(params)
    return [
        [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
        for combo in itertools.product(*(params[k] for k in keys))
    ]


def component(node: Any) -> str:
    """The module of a component's ``_target_``: its config option (``NONE`` -> ``none``)."""
    return str(node._target_).split(".")[-2]


def test_every_experiment_is_a_multirun_with_its_command_in_the_header() -> None:
    assert EXPERIMENTS
    for name in EXPERIMENTS:
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n"), name
        assert f"python -m benchmark.run experiment={name}" in text, name
        assert hydra_config(name).mode == RunMode.MULTIRUN, name
        assert cells(name), name


def pairs(name: str, conf_dir: str = CONF_DIR) -> list[tuple[str, str]]:
    """The (attack, defense) pairs of an experiment that sweeps ``cell=<attack>__<defense>``."""
    return [tuple(c.split("__")) for c in sweep_params(name, conf_dir)["cell"]]  # type: ignore[misc]


def covers(
    cell_pairs: list[tuple[str, str]],
    attacks: set[str],
    defenses: set[str],
    conf_dir: str = CONF_DIR,
) -> None:
    """Every attack, every defense, every attack undefended, every defense on BadNets, and every
    (attack, defense family) pair, each cell once."""
    loader = grid.package_loader(conf_dir)
    assert len(set(cell_pairs)) == len(cell_pairs)
    assert {a for a, _ in cell_pairs} == attacks and {d for _, d in cell_pairs} == defenses
    assert {(a, "undefended") for a in attacks} <= set(cell_pairs)
    assert {("badnets", d) for d in defenses} <= set(cell_pairs)
    family = {d: grid.family(d, loader) for d in defenses - {"undefended"}}
    met = {(a, family[d]) for a, d in cell_pairs if d != "undefended"}
    assert met == {(a, f) for a in attacks for f in set(family.values())}


# Exclusions from the derived grids, each with its reason: experiment -> {option: reason}. Empty
# today; an entry here must match the experiment's resolver arguments.
EXCLUDED: dict[str, dict[str, str]] = {}


def test_smoke_all_covers_every_attack_defense_and_family() -> None:
    params = sweep_params("smoke_all")
    assert params["seed"] == ["0"] and set(params) >= {"cell", "debug"}
    attacks, defenses = ATTACKS - set(EXCLUDED.get("smoke_all", {})), DEFENSES
    covers(pairs("smoke_all"), attacks, defenses)
    # Grows with attacks + defenses: A undefended + (D - 1) on BadNets + (A - 1) x families.
    n_families = len({grid.family(d) for d in defenses - {"undefended"}})
    expected = len(attacks) + len(defenses) - 1 + (len(attacks) - 1) * n_families
    assert len(cells("smoke_all")) == expected
    assert pairs("smoke_all") == grid.cells("covering")


def test_smoke_full_is_every_attack_x_every_defense_at_smoke_all_settings() -> None:
    full, smoke = sweep_params("smoke_full"), sweep_params("smoke_all")
    assert full["attack"] == grid.ordered(ATTACKS) and full["defense"] == grid.ordered(DEFENSES)
    assert len(cells("smoke_full")) == len(ATTACKS) * len(DEFENSES)
    rest = {k: v for k, v in full.items() if k not in ("attack", "defense")}
    assert rest == {k: v for k, v in smoke.items() if k != "cell"}


def test_no_experiment_hand_lists_a_whole_config_group() -> None:
    """Grids come from the groups (``${bench_options:...}``, ``${bench_cells:...}``): a literal
    list of every attack, every defense, or every BackdoorBench setting is a hand list that a
    new method would silently miss."""
    groups = {"attack": [ATTACKS], "defense": [DEFENSES]}
    groups["attack_setting"] = [
        {f"{d.name}/{p.stem}" for p in d.glob("*.yaml")}
        for d in (CONF / "attack_setting").iterdir()
        if d.is_dir()
    ]
    for name in EXPERIMENTS:
        for key, value in raw_sweep_params(name).items():
            if "${" in value:
                continue
            listed = {v.strip() for v in value.split(",")}
            if key == "cell":
                listed_attacks = {c.split("__")[0] for c in listed}
                assert not (len(listed) > 1 and listed_attacks == ATTACKS), (name, key)
            for every in groups.get(key, []):
                if len(every) > 1:
                    assert listed != every, f"{name}: {key} lists every option; derive it"


def test_derived_lists_are_the_config_groups_minus_the_named_exclusions() -> None:
    for name in EXPERIMENTS:
        raw, params = raw_sweep_params(name), sweep_params(name)
        for key, value in raw.items():
            if value.startswith("${bench_options:"):
                group = value.removeprefix("${bench_options:").rstrip("}").split(",")[0]
                excluded = set(EXCLUDED.get(name, {}))
                expected = grid.ordered(
                    p.stem for p in (CONF / group).glob("*.yaml") if p.stem not in excluded
                )
                prefix = f"{group.split('/', 1)[1]}/" if "/" in group else ""
                assert params[key] == [prefix + o for o in expected], (name, key)
                assert excluded <= set(value.split("[", 1)[-1].rstrip("]}").split(",")), name


BACKDOORBENCH = sorted(
    f"backdoorbench/{p.stem}" for p in (CONF / "attack_setting" / "backdoorbench").glob("*.yaml")
)
BB_EXPERIMENTS = {
    "backdoorbench_cifar10": 0.1,
    "backdoorbench_cifar10_5pct": 0.05,
    "backdoorbench_cifar10_1pct": 0.01,
}


@pytest.mark.parametrize("name", sorted(BB_EXPERIMENTS))
def test_backdoorbench_experiments_cross_its_attack_settings_with_every_defense(
    name: str, tmp_path: Path
) -> None:
    """Every BackdoorBench attack as BackdoorBench sets it up, x every defense, at one rate of
    the whole training set (clean label included: BackdoorBench's pratio)."""
    params = sweep_params(name)
    assert sorted(params["attack_setting"]) == BACKDOORBENCH
    # BackdoorBench's attacks as it sets them up (a subset of ours: natural and any attack it
    # has no setting for are not part of its tables).
    bb_attacks = {s.split("/")[1] for s in BACKDOORBENCH}
    assert {"badnets", "blend", "sig", "label_consistent", "wanet"} <= bb_attacks <= ATTACKS
    assert set(params["defense"]) == DEFENSES and params["seed"] == ["0"]
    rate = BB_EXPERIMENTS[name]
    for setting in BACKDOORBENCH:
        rest = [f"{k}={v[0]}" for k, v in params.items() if k not in ("attack_setting", "defense")]
        cfg = compose_cfg(
            [f"experiment={name}", f"attack_setting={setting}", "defense=undefended", *rest],
            tmp_path,
        )
        attack = setting.split("/")[1]
        assert component(cfg.attack) == attack
        assert cfg.attack.poison_rate == pytest.approx(rate) and cfg.attack.target_class == 0
        assert cfg.attack.get("rate_of", "train_set") == "train_set"
        assert component(cfg.model) == "preact_resnet18" and cfg.model.width == 64
        assert cfg.train.epochs == 100 and cfg.train.lr == 0.01 and cfg.train.batch_size == 128
        scheduler = cfg.train.scheduler
        if attack == "wanet":  # BackdoorBench's WaNet yaml: constant lr 0.01 over 100 epochs
            assert scheduler._target_.endswith("MultiStepLR") and min(scheduler.milestones) == 100
        else:
            assert scheduler._target_.endswith("CosineAnnealingLR") and scheduler.T_max == 100
        if attack == "blend":  # the user's Hello Kitty file, never a shipped one
            assert cfg.attack.key_path is None and cfg.attack.alpha == cfg.attack.test_alpha == 0.2
    assert len(cells(name)) == len(BACKDOORBENCH) * len(DEFENSES)


def test_backdoorbench_blend_takes_the_key_from_paths_hello_kitty(tmp_path: Path) -> None:
    cfg = compose_cfg(
        ["attack_setting=backdoorbench/blend", "paths.hello_kitty=/k/hello_kitty.jpeg"], tmp_path
    )
    assert cfg.attack.key_path == "/k/hello_kitty.jpeg"


def test_cifar10_cpu_is_attacks_undefended_plus_defenses_on_badnets(tmp_path: Path) -> None:
    pairs = set()
    for cell, seed in cells("cifar10_cpu"):
        assert seed == "seed=0"
        cfg = compose_cfg(["experiment=cifar10_cpu", cell], tmp_path)
        assert component(cfg.dataset) == "imagefolder" and OmegaConf.is_missing(cfg.dataset, "root")
        assert component(cfg.model) == "preact_resnet18" and cfg.model.width == 16
        assert cfg.dataset.max_train == 10000 and cfg.train.epochs == 20
        assert cfg.defense_data.clean_fraction == 0.025
        attack, defense = cell.removeprefix("cell=").split("__")
        # The name says the pair (module names: NONE is defenses/none.py; a config-only
        # variant is its base entry's class).
        modules = (base_entry("attack", attack), base_entry("defense", defense).lower())
        assert (component(cfg.attack), component(cfg.defense)) == modules
        pairs.add((attack, defense))
    expected = {(a, "undefended") for a in ATTACKS} | {("badnets", d) for d in DEFENSES}
    assert pairs == expected and len(cells("cifar10_cpu")) == len(expected)
    # The undefended cells first: a parallel launcher trains the six models at once.
    assert all("__undefended" in c[0] for c in cells("cifar10_cpu")[: len(ATTACKS)])


@pytest.mark.parametrize(
    ("name", "mode"), [("fast_validation", "anchor"), ("fast_validation_gpu", "product")]
)
def test_fast_validation_runs_every_cell_on_both_tracks_on_the_same_data(
    name: str, mode: str, tmp_path: Path
) -> None:
    params = sweep_params(name)
    reference, fast = params["track"]
    assert reference.startswith("standard") and fast.startswith("fast")
    names = ["__".join(pair) for pair in grid.cells(mode)]
    assert params["cell"] == names and params["seed"] == ["0"]
    models = {}
    for track in params["track"]:
        runs = [compose_cfg([f"experiment={name}", f"track={track}", c], tmp_path)
                for c in (f"cell={names[-1]}", "cell=badnets__ulrl")]  # fmt: skip
        # Only the model and the recipe differ between the tracks: the data, the reserve and
        # the methods' settings are the cell's.
        for cfg in runs:
            assert component(cfg.dataset) == "imagefolder"
            assert OmegaConf.is_missing(cfg.dataset, "root")
        models[track] = [(component(c.model), c.train.epochs, c.train.batch_size) for c in runs]
        shared = [OmegaConf.to_container(c.dataset) for c in runs]
        shared += [OmegaConf.to_container(c.defense_data) for c in runs]
        shared += [OmegaConf.to_container(c.attack) for c in runs]
        shared += [OmegaConf.to_container(c.defense) for c in runs]
        models[f"{track}/shared"] = shared
    assert models[f"{reference}/shared"] == models[f"{fast}/shared"]
    assert {m for m, _, _ in models[reference]} == {"preact_resnet18"}
    assert {m for m, _, _ in models[fast]} == {"fastnet"}
    assert {(e, b) for _, e, b in models[fast]} == {(10, 1024)}
    full = name.endswith("_gpu")
    assert {(e, b) for _, e, b in models[reference]} == {(100 if full else 20, 128)}


def test_every_cell_file_names_its_attack_and_defense(tmp_path: Path) -> None:
    for path in sorted((CONF / "cell").glob("*.yaml")):
        attack, defense = path.stem.split("__")
        cfg = compose_cfg([f"cell={path.stem}"], tmp_path)
        assert component(cfg.attack) == attack, path
        # <defense> or <defense>_<variant> (badnets__mmac_floor0: mmac with bound_floor 0.0)
        name = component(cfg.defense)
        assert defense.lower() == name or defense.lower().startswith(f"{name}_"), path


# name -> (model, dataset, the cell to compose, values that cell must have)
PAPER_SETTINGS: dict[str, tuple[str, str, list[str], dict[str, Any]]] = {
    "backdoorbench_cifar10": (
        "preact_resnet18",
        "cifar10",
        ["attack_setting=backdoorbench/blend", "defense=ulrl"],
        {
            "model.width": 64,
            "attack.poison_rate": 0.1,
            "attack.target_class": 0,
            "attack.mode": "all2one",
            "train.epochs": 100,
            "train.lr": 0.01,
            "train.batch_size": 128,
            "defense.relearn_lr": 0.005,  # ulrl_cifar10 tuning applies
        },
    ),
    "backdoorbench_cifar10_5pct": (
        "preact_resnet18",
        "cifar10",
        ["attack_setting=backdoorbench/sig", "defense=undefended", "attack.poison_rate=0.05"],
        {"attack.poison_rate": 0.05, "attack.rate_of": "train_set", "attack.delta": 40},
    ),
    "backdoorbench_cifar10_1pct": (
        "preact_resnet18",
        "cifar10",
        [
            "attack_setting=backdoorbench/label_consistent",
            "defense=undefended",
            "attack.poison_rate=0.01",
        ],
        {"attack.poison_rate": 0.01, "attack.rate_of": "train_set", "attack.amplitude": 1.0},
    ),
    "ultraclean_cifar10": (
        "vgg16_bn",
        "cifar10",
        ["attack_setting=ultraclean/blend", "defense=ultraclean"],
        {
            "attack.poison_rate": 0.1,
            "attack.target_class": 1,
            "defense.removal_ratio": 0.3,
            "defense.known_target": None,
            "train.epochs": 200,
            "train.lr": 0.1,
            "train.scheduler": None,
        },
    ),
    "ultraclean_cifar10_clean_label": (
        "resnet18",
        "cifar10",
        ["defense.removal_ratio=0.15"],
        {
            "attack.poison_rate": 0.4,
            "attack.rate_of": "target_class",
            "attack.amplitude": 64 / 255,
            "defense.removal_ratio": 0.15,
        },
    ),
    "none_cifar10": (
        "resnet18",
        "cifar10",
        ["defense=NONE"],
        {
            "attack.poison_rate": 0.05,
            "attack.target_class": 0,
            "attack.size": 3,
            "defense.rounds": 1,
            "defense.reset_fraction": 0.03,
            "train.epochs": 200,
            "train.lr": 0.1,
            "train.optimizer.weight_decay": 1e-4,
            "train.scheduler._target_": "torch.optim.lr_scheduler.MultiStepLR",
            "train.scheduler.milestones": [80, 160],
            "train.scheduler.gamma": 0.1,
        },
    ),
    "none_natural_cifar10": (
        "nin",
        "cifar10",
        ["defense=NONE"],
        {
            "attack.budgets": [0.02, 0.04, 0.06, 0.08, 0.1, 0.12],
            "defense.rounds": 10,
            "defense.finetune_epochs": 40,
            "defense.reset_fraction": 0.2,
            "train.optimizer.momentum": 0.95,
            "train.optimizer.weight_decay": 1e-4,
            "train.epochs": 200,
            "train.scheduler.milestones": [80, 160],
        },
    ),
    "ulrl_cifar10": (
        "preact_resnet18",
        "cifar10",
        ["attack_setting=backdoorbench/sig", "defense=ulrl"],
        {
            "defense.clean_fraction_of_train": 0.01,
            "defense.relearn_lr": 0.005,
            "defense.alpha": 0.7,
            "train.epochs": 100,
        },
    ),
    "mmac_cifar10": (
        "resnet18",
        "cifar10",
        ["cell=badnets__mmac_floor0"],
        {
            "attack.mode": "all2one",
            "attack.poison_rate": 0.1,
            "defense.per_class": 50,
            "defense.bound_floor": 0.0,
        },
    ),
    "mmac_cifar10_all2all": (
        "resnet18",
        "cifar10",
        ["cell=badnets__mmac"],
        {
            "attack.mode": "all2all",
            "attack.poison_rate": 0.1,
            "defense.per_class": 50,
            "train.optimizer._target_": "torch.optim.Adam",
            "train.lr": 1e-3,
            "train.batch_size": 32,
            "train.epochs": 50,
            "train.scheduler": None,
        },
    ),
    "linf_prune_cifar10": (
        "preact_resnet18",
        "cifar10",
        ["cell=badnets__linf_prune"],
        {"attack.poison_rate": 0.1, "defense.ranking": "inverted_desc"},
    ),
}

# Each seed paper's experiment: its own defense(s) and the baselines beside it (each file's
# header says where the list comes from).
PAPER_BASELINES: dict[str, tuple[set[str], set[str]]] = {
    "none_cifar10": ({"NONE"}, {"abl", "ac", "ss", "clp"}),  # no clean data
    "ultraclean_cifar10": ({"ultraclean"}, {"ss", "ac", "abl", "clp"}),  # no clean data
    "ulrl_cifar10": ({"ulrl"}, {"ft", "fp", "nad", "nc", "anp", "i_bau", "clp"}),
    "mmac_cifar10": (
        {"mmac", "mmac_floor0", "mmbm", "mmbm_floor0"},
        {"ft", "fp", "nad", "nc", "anp", "i_bau", "clp", "strip"},
    ),
    "linf_prune_cifar10": (
        {"linf_prune", "linf_prune_clean_asc", "linf_prune_inverted_diff_desc"},
        {"fp", "nc"},
    ),
}


def _defenses_swept(name: str) -> list[tuple[list[str], str]]:
    """One job per defense of an experiment: (its overrides, the defense's name)."""
    found: dict[str, list[str]] = {}
    for job in cells(name):
        names = [o.split("=", 1)[1] for o in job if o.startswith(("defense=", "cell="))]
        (defense,) = [n.split("__")[-1] for n in names]
        found.setdefault(defense, job)
    return [(job, defense) for defense, job in found.items()]


@pytest.mark.parametrize("name", sorted(PAPER_BASELINES))
def test_paper_experiments_run_their_defense_beside_the_baselines(
    name: str, tmp_path: Path
) -> None:
    own, baselines = PAPER_BASELINES[name]
    jobs = _defenses_swept(name)
    assert {d for _, d in jobs} - {"undefended"} == own | baselines
    for job, _ in jobs:  # each accepts the setting's data sizes (e.g. no clean reserve)
        cfg = compose_cfg([f"experiment={name}", *job], tmp_path)
        n = 50_000
        n_clean = round(cfg.defense_data.clean_fraction * n)
        instantiate(cfg.defense).validate(10, n - n_clean, n_clean)


def test_every_paper_experiment_has_a_setting_check() -> None:
    others = {"smoke_all", "smoke_full", "cifar10_cpu", "badnets_seeds"}
    others |= {"fast_validation", "fast_validation_gpu"}
    assert set(EXPERIMENTS) - others == set(PAPER_SETTINGS)


@pytest.mark.parametrize("name", sorted(PAPER_SETTINGS))
def test_paper_experiments_pin_the_notes_setting(name: str, tmp_path: Path) -> None:
    model, dataset, cell, expected = PAPER_SETTINGS[name]
    assert any(set(cell) <= set(c) for c in cells(name)), f"{cell} is not a cell of {name}"
    cfg = compose_cfg([f"experiment={name}", *cell], tmp_path)
    assert component(cfg.model) == model and component(cfg.dataset) == dataset
    for key, value in expected.items():
        got = OmegaConf.select(cfg, key, throw_on_missing=True)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key


def test_smoke_all_sizes_beat_debug_smoke_and_keep_the_defense_deltas(tmp_path: Path) -> None:
    params = sweep_params("smoke_all")
    assert params["debug"] == ["smoke"]
    cell = ["cell=natural__NONE"]
    rest = [f"{k}={v[0]}" for k, v in params.items() if k != "cell"]
    cfg = compose_cfg(["experiment=smoke_all", *rest, *cell], tmp_path)
    assert component(cfg.dataset) == "mnist5k" and component(cfg.model) == "small_cnn"
    assert cfg.dataset.max_train == 2000 and cfg.dataset.max_test == 500
    assert cfg.train.epochs == 5 and cfg.progress is False  # debug=smoke is applied
    assert cfg.defense.rounds == 1 and cfg.defense.finetune_epochs == 1  # NONE_smoke
    assert cfg.attack.steps == 100  # natural_mnist5k
    mmac = compose_cfg(["experiment=smoke_all", *rest, "cell=badnets__mmac"], tmp_path)
    assert mmac.defense.epochs == 4  # mmac_smoke


# Per experiment: the cell to run, and overrides that keep its slow parts tiny in the test.
RUN_CELLS: dict[str, list[str]] = {
    "backdoorbench_cifar10": ["attack_setting=backdoorbench/badnets", "defense=ulrl"],
    "backdoorbench_cifar10_5pct": ["attack_setting=backdoorbench/sig", "defense=undefended"],
    "backdoorbench_cifar10_1pct": ["attack_setting=backdoorbench/wanet", "defense=mmbm"],
    "smoke_all": ["cell=badnets__linf_prune"],  # always a cell (every defense on BadNets)
    "smoke_full": ["attack=sig", "defense=linf_prune"],
    "badnets_seeds": ["seed=1"],
    "cifar10_cpu": ["cell=badnets__mmbm"],
    "fast_validation": ["track=fast_cpu", "cell=badnets__linf_prune"],
    "fast_validation_gpu": ["track=fast", "cell=wanet__ulrl"],
    # BadNets: the Blend cell needs attack.formula (helper H3's branch).
    "ultraclean_cifar10": ["attack_setting=ultraclean/badnets", "defense=ultraclean"],
    "ultraclean_cifar10_clean_label": [
        "defense.removal_ratio=0.3",
        "attack.steps=2",
        "attack.adv_train.steps=1",
    ],
    # lr 0.1 with no warm-up wrecks ResNet-18 in one smoke epoch (loss 5.7, chance accuracy),
    # and NONE's fine-tuning of that model then goes NaN (TrainingDiverged): the test runs the
    # cell's code path at a learning rate one smoke epoch survives.
    "none_cifar10": ["defense=NONE", "train.lr=0.01"],
    "none_natural_cifar10": ["defense=undefended", "attack.steps=3", "attack.budgets=[0.06]"],
    "ulrl_cifar10": ["attack=blend", "defense=ulrl"],
    "mmac_cifar10": ["cell=badnets__mmbm_floor0"],
    "mmac_cifar10_all2all": ["cell=badnets__undefended"],
    # Width 16: at full width this cell took 157 s in CI; the code path is the same.
    "linf_prune_cifar10": ["cell=badnets__linf_prune_clean_asc", "model.width=16"],
}


def test_every_experiment_has_a_run_cell() -> None:
    assert set(RUN_CELLS) == set(EXPERIMENTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_one_cell_of_each_experiment_runs_at_smoke_size(
    make_cfg, name: str, tmp_path: Path
) -> None:
    cell = RUN_CELLS[name]
    swept = [o for o in cell if o.split("=")[0] in sweep_params(name)]
    assert any(set(swept) <= set(c) for c in cells(name)), f"{cell} is not a cell of {name}"
    pinned = compose_cfg([f"experiment={name}", *cell], tmp_path)
    # No CIFAR-10 (or image folder) offline: the same cell on mnist5k, model and method kept.
    data = [] if component(pinned.dataset) in DIGIT_DATA else ["dataset=mnist5k"]
    cfg = make_cfg(f"experiment={name}", *cell, *data)
    assert component(cfg.model) == component(pinned.model)
    assert component(cfg.attack) == component(pinned.attack)
    assert component(cfg.defense) == component(pinned.defense)
    assert cfg.train.epochs == 1 and cfg.dataset.max_train == 600  # debug=smoke applies
    record = pipeline.run(cfg, run_dir=tmp_path / "run")
    assert record["status"] == "complete" and record["error"] is None
    for stage in ("backdoored", "defended"):
        assert 0.0 <= record[stage]["clean_acc"] <= 1.0


@pytest.mark.slow
@pytest.mark.sweep
def test_smoke_all_runs_every_cell_and_writes_the_tables(tmp_path: Path) -> None:
    """The whole smoke grid from the command line, as CI runs it (a few minutes on 2 cores)."""
    from tests.benchmark.test_run import cli, records

    proc = cli(["experiment=smoke_all", "logger=none"], tmp_path, timeout=1500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = records(tmp_path)
    cells = {(r["choices"]["attack"], r["choices"]["defense"]) for r in runs}
    assert cells == set(grid.cells("covering"))
    covers(sorted(cells), ATTACKS, DEFENSES)
    assert len(runs) == len(cells) and all(r["status"] == "complete" for r in runs)
    (tables,) = (tmp_path / "outputs").rglob("tables")
    for name in ("asr.md", "ca.md", "detection.md", "heatmap_asr.png"):
        assert (tables / name).stat().st_size > 0


def _attack_key(name: str) -> str:
    return "attack_setting" if "attack_setting" in sweep_params(name) else "attack"


def _attacks_swept(name: str) -> list[str]:
    params = sweep_params(name)
    if "cell" in params:
        return sorted({c.split("__")[0] for c in params["cell"]})
    return params.get(_attack_key(name), [])


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if len(_attacks_swept(n)) > 1])
def test_parallel_launchers_start_with_one_cell_per_attack(name: str) -> None:
    """The first jobs of a sweep are the baseline of every attack: run in parallel, they train
    the different backdoored models at once, not wait on one model's lock."""
    attacks = _attacks_swept(name)
    first = cells(name)[: len(attacks)]
    if "cell" in sweep_params(name):
        got = [o.removeprefix("cell=").split("__") for c in first for o in c if "cell=" in o]
        assert sorted(a for a, _ in got) == attacks and all(d == "undefended" for _, d in got)
        return
    key = _attack_key(name)
    assert {o for c in first for o in c if o.startswith(f"{key}=")} == {
        f"{key}={a}" for a in attacks
    }
    assert all("defense=undefended" in c for c in first)
