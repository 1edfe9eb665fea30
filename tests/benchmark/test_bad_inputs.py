"""The bad-input battery: every known bad setting through the CLI, in subprocesses.

Each must end with exit status 2 and exactly one error line that names the key, print no
traceback, and leave no ``complete`` metrics.json and no cache entry behind; none may get as
far as loading data (a failed record keeps ``data`` empty). Validation only: nothing trains,
so the battery runs in parallel subprocesses; still, 42 interpreter start-ups (~4 s of CPU each,
torch's import) take ~2 minutes on two cores, so the whole battery is marked slow (CI's second
step, ``make test-slow``) and the Hydra-level cases stay in ``make test``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.benchmark.test_run import ROOT, _env

pytestmark = pytest.mark.sweep


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    key: str  # the setting the one error line must name
    env: dict[str, str] = field(default_factory=dict)


def one_class_folder(root: Path) -> Path:
    for split in ("train", "test"):
        folder = root / "one_class" / split / "cat"
        folder.mkdir(parents=True)
        for i in range(3):
            pixels = np.full((8, 8, 3), 40 * i, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root / "one_class"


def cases(tmp: Path) -> list[Case]:
    a_file = tmp / "a_file"
    a_file.write_text("not a folder\n")
    folder = one_class_folder(tmp)
    return [
        # Silently wrong before this battery existed.
        Case("negative grad_clip", ("train.grad_clip=-1",), "train.grad_clip"),
        Case("zero grad_clip", ("train.grad_clip=0",), "train.grad_clip"),
        Case("text grad_clip", ("train.grad_clip=big",), "train.grad_clip"),
        Case("fractional seed", ("seed=1.5",), "seed"),
        Case("max_train above the split", ("dataset.max_train=100000",), "dataset.max_train"),
        Case("max_test above the split", ("dataset.max_test=100000",), "dataset.max_test"),
        Case("cell vs attack", ("cell=badnets__mmac", "attack=blend"), "cell"),
        Case("cell vs defense", ("cell=badnets__mmac", "defense=ulrl"), "cell"),
        Case("progress not a boolean", ("progress=yes",), "progress"),
        Case("resume not a boolean", ("resume=1",), "resume"),
        # Tracebacks or late failures before.
        Case(
            "one-class image folder",
            ("dataset=imagefolder", f"dataset.root={folder}"),
            "dataset.root",
        ),
        Case("zero width", ("model.width=0",), "model.width"),
        Case("negative width", ("model=preact_resnet18", "model.width=-2"), "model.width"),
        Case("unknown timm model", ("model=timm", "model.name=resnet_18"), "model.name"),
        Case("text seed", ("seed=x",), "seed"),
        Case("unknown device", ("device=tpu",), "device"),
        Case("absent GPU", ("device=cuda:7",), "device"),
        Case(
            "output folder below a file",
            (),
            "paths.log_dir",
            {"BENCH_OUTPUT_DIR": str(a_file / "outputs")},
        ),
        Case(
            "cache folder below a file",
            (),
            "paths.cache_dir",
            {"BENCH_CACHE_DIR": str(a_file / "cache")},
        ),
        Case(
            "sweep output folder below a file",
            ("-m", "seed=0,1"),
            "paths.log_dir",
            {"BENCH_OUTPUT_DIR": str(a_file / "outputs")},
        ),
        # Handled before; kept here so they stay handled.
        Case("poison rate above 1", ("attack.poison_rate=1.5",), "attack.poison_rate"),
        Case("poison rate 0", ("attack.poison_rate=0",), "attack.poison_rate"),
        Case("target outside the classes", ("attack.target_class=10",), "attack.target_class"),
        Case("negative target", ("attack.target_class=-1",), "attack.target_class"),
        Case("unknown mode", ("attack.mode=one2one",), "attack.mode"),
        Case("zero trigger size", ("attack.size=0",), "attack.size"),
        Case("blend key missing", ("attack=blend", "attack.key_path=/nonexistent.png"), "key_path"),
        Case("blend alpha above 1", ("attack=blend", "attack.alpha=1.5"), "attack.alpha"),
        Case("unknown blend formula", ("attack=blend", "attack.formula=mix"), "attack.formula"),
        Case("zero epochs", ("train.epochs=0",), "train.epochs"),
        Case("fractional epochs", ("train.epochs=2.5",), "train.epochs"),
        Case("zero batch", ("train.batch_size=0",), "train.batch_size"),
        Case("negative lr", ("train.lr=-0.1",), "train.lr"),
        Case("amp not a boolean", ("train.amp=maybe",), "train.amp"),
        Case(
            "reserve of everything",
            ("defense_data.clean_fraction=1.0",),
            "defense_data.clean_fraction",
        ),
        Case("max_train below the classes", ("dataset.max_train=5",), "dataset.max_train"),
        Case("text max_test", ("dataset.max_test=many",), "dataset.max_test"),
        Case(
            "missing image folder",
            ("dataset=imagefolder", f"dataset.root={tmp / 'absent'}"),
            "dataset.root",
        ),
        Case(
            "timm kwargs that the harness sets",
            ("model=timm", "+model.kwargs.pretrained=true"),
            "model.kwargs",
        ),
        Case("unknown l-inf ranking", ("defense=linf_prune", "defense.ranking=up"), "ranking"),
        Case("mmac without clean data", ("defense=mmac", "defense_data.clean_fraction=0"), "clean"),
        Case("NONE zero fine-tuning lr", ("defense=NONE", "defense.finetune_lr=0"), "finetune_lr"),
    ]


def run_case(case: Case, tmp: Path) -> tuple[Case, subprocess.CompletedProcess, Path]:
    work = tmp / case.name.replace(" ", "_")
    env = _env(work)
    env.update(case.env)
    flags = [a for a in case.args if a.startswith("-")]  # before the overrides (argparse)
    values = [a for a in case.args if not a.startswith("-")]
    args = [*flags, "logger=none", "progress=false", *values]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark.run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard only
    )
    return case, proc, work


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "ERROR" in line or line.startswith("Error")]


@pytest.mark.slow
def test_every_bad_input_gets_one_clear_error_before_any_work(tmp_path: Path) -> None:
    battery = cases(tmp_path)
    workers = max(2, min(4, os.cpu_count() or 2))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda c: run_case(c, tmp_path), battery))
    problems = []
    for case, proc, work in results:
        out = proc.stdout + proc.stderr
        errors = error_lines(out)
        if proc.returncode != 2:
            problems.append(f"{case.name}: exit {proc.returncode}\n{out[-2000:]}")
        elif "Traceback" in out:
            problems.append(f"{case.name}: printed a traceback\n{out[-2000:]}")
        elif len(errors) != 1 or case.key not in errors[0]:
            problems.append(f"{case.name}: error lines {errors} do not name {case.key}")
        for path in work.rglob("metrics.json"):
            record = json.loads(path.read_text())
            if record["status"] == "complete" or record.get("data"):
                problems.append(f"{case.name}: {path} got past validation")
        if list(work.rglob("entry.sha256")) or list((work / "cache").rglob("*.pt")):
            problems.append(f"{case.name}: left a cache entry")
    print(f"battery: {len(battery)} inputs, {len(battery) - len(problems)} clear")
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize(
    ("args", "key", "message"),
    [
        (("attack=badnet",), "attack=badnet", "choose one of badnets, blend"),
        (("model.kwargs.num_classes=3",), "model.kwargs.num_classes", "no such key"),
        (("seed=[",), "seed", "cannot parse the override"),
        (("-m", "attack=badnets,blnd"), "attack=blnd", "close: blend"),
    ],
)
def test_hydra_composition_errors_are_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], key: str, message: str
) -> None:
    """Hydra's own composition errors (benchmark/composition.py): exit status 2, one error
    line naming the key or the option, no traceback, nothing written; in a sweep the bad
    second value stops it before the first cell trains."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark.run", *args, "logger=none"],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    errors = error_lines(out)
    assert proc.returncode == 2, out
    assert len(errors) == 1 and key in errors[0] and message in errors[0], out
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out, out
    assert not list(tmp_path.rglob("metrics.json"))
    assert not list(tmp_path.rglob("*.pt"))


def test_hydra_full_error_keeps_hydras_report(tmp_path: Path) -> None:
    """HYDRA_FULL_ERROR=1 is Hydra's switch for its whole report: the guard steps aside."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark.run", "logger=none", "attack=badnet"],
        cwd=ROOT,
        env={**_env(tmp_path), "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" in out, out
    assert "Could not find 'attack/badnet'" in out, out
