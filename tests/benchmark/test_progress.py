"""Progress bars of the long stages: one switch hides them all; a bar never changes a result."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from attacks.inversion import invert_triggers
from benchmark import pipeline, progress
from benchmark.datasets._imagecache import decode_images, list_images
from benchmark.models.small_cnn import SmallCNN
from benchmark.train import fit
from defenses.clipping import synthesize_max_margin
from defenses.linf_scores import prune_count
from defenses.none_passes import collect_statistics
from defenses.none_reset import reset_sites
from defenses.ultraclean_denoise import median_smooth, nl_means
from tests.conftest import toy_set
from tests.defenses.toys import RECIPE


@pytest.fixture(autouse=True)
def restore_switch() -> Iterator[None]:
    before = progress.enabled()
    yield
    progress.set_enabled(before)


def stderr_of(capfd: pytest.CaptureFixture[str], on: bool, stage: Callable[[], Any]) -> tuple:
    """``(stderr, result)`` of ``stage()`` run with the switch ``on``."""
    progress.set_enabled(on)
    capfd.readouterr()
    result = stage()
    return capfd.readouterr().err, result


def both(capfd: pytest.CaptureFixture[str], stage: Callable[[], Any], desc: str) -> tuple:
    """Run ``stage`` with the switch off (silent) and on (a bar labelled ``desc``)."""
    quiet, off = stderr_of(capfd, False, stage)
    assert quiet == ""
    shown, on = stderr_of(capfd, True, stage)
    assert desc in shown
    return off, on


def tiny_net(in_chans: int = 1, size: int = 6, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_chans, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * size * size, classes),
    ).eval()


def test_bar_follows_the_switch(capsys: pytest.CaptureFixture[str]) -> None:
    progress.set_enabled(False)
    assert not progress.enabled()
    assert list(progress.bar(range(3), desc="quiet stage")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    progress.set_enabled(True)
    with progress.bar(total=3, desc="loud stage", unit="img") as b:
        b.update(3)
    assert "loud stage" in capsys.readouterr().err
    assert list(progress.bar(range(2), desc="hidden anyway", disable=True)) == [0, 1]
    assert capsys.readouterr().err == ""


def test_decoding_an_image_folder(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    paths = list_images(tmp_path)
    off, on = both(
        capfd,
        lambda: decode_images(paths, (3, 4, 6), resize=False, desc="decoding toy images"),
        "decoding toy images",
    )
    assert torch.equal(off, on)


def test_fit_needs_both_its_flag_and_the_switch(capfd: pytest.CaptureFixture[str]) -> None:
    data = toy_set(32, 3, (1, 6, 6))

    def train(flag: bool) -> Callable[[], list[dict[str, float]]]:
        return lambda: (
            fit(
                tiny_net(), data, OmegaConf.create(RECIPE), epochs=1, progress=flag, desc="toy fit"
            ).history
        )

    assert stderr_of(capfd, True, train(False))[0] == ""
    off, on = both(capfd, train(True), "toy fit 1/1")
    assert [h["loss"] for h in off] == [h["loss"] for h in on]


def test_trigger_inversion(capfd: pytest.CaptureFixture[str]) -> None:
    data = toy_set(24, 3, (1, 6, 6))
    off, on = both(
        capfd,
        lambda: invert_triggers(
            tiny_net(), data.x, data.y, targets=[0, 1], budgets=[0.2], steps=5, batch_size=8
        ),
        "trigger inversion (2 triggers)",
    )
    assert torch.equal(off.mask, on.mask) and torch.equal(off.pattern, on.pattern)


def test_max_margin_synthesis(capfd: pytest.CaptureFixture[str]) -> None:
    def synth() -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return synthesize_max_margin(
            tiny_net(), 3, 2, (1, 6, 6), steps=4, lr=0.1, gen=gen, device=torch.device("cpu")
        )

    off, on = both(capfd, synth, "max-margin synthesis (6 images)")
    assert torch.equal(off[0], on[0])


def test_ultraclean_denoising(capfd: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    off, on = both(capfd, lambda: nl_means(x, workers=2), "UltraClean NL-means denoising")
    assert np.array_equal(off, on)
    off, on = both(capfd, lambda: nl_means(x, workers=1), "UltraClean NL-means denoising")
    assert np.array_equal(off, on)
    off, on = both(capfd, lambda: median_smooth(x, chunk=4), "UltraClean median filter")
    assert np.array_equal(off, on)


def test_none_analysis_and_linf_pruning_search(capfd: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = SmallCNN(3, 3, (12, 12), [0.5] * 3, [0.25] * 3, width=4)
    data = toy_set(20, 3)
    sites = reset_sites(model)

    def stats() -> torch.Tensor:
        (st, *_) = collect_statistics(
            model,
            sites,
            data,
            num_classes=3,
            lambda_low=0.1,
            lambda_high=0.9,
            device=torch.device("cpu"),
            batch_size=8,
        )
        return st.scores(1.0)

    off, on = both(capfd, stats, "NONE hyperplane statistics")
    assert torch.equal(off, on)
    accs = [0.9, 0.9, 0.85, 0.6, 0.5]
    off, on = both(
        capfd, lambda: prune_count(lambda k: accs[k], 0.9, 4, 0.1, desc="fp pruning"), "fp pruning"
    )
    assert off == on == (2, "acc_budget")


@pytest.mark.parametrize("flag", [False, True])
def test_each_cell_sets_the_switch_from_its_config(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: bool
) -> None:
    def stop(*args: object) -> None:
        raise RuntimeError("stop after the switch")

    monkeypatch.setattr(pipeline, "build", stop)
    progress.set_enabled(not flag)
    with pytest.raises(RuntimeError, match="stop after the switch"):
        pipeline.run(make_cfg(f"progress={str(flag).lower()}"), run_dir=tmp_path / "run")
    assert progress.enabled() is flag
