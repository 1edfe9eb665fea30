"""Trigger, poison and inverted-trigger pictures: size, labels, classes, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmark.evaluate import poison_grid, trigger_grid
from benchmark.pictures import MIN_SIZE, class_name, distinct_first, labelled_grid
from benchmark.results import save_inverted_triggers
from benchmark.types import ImageSet, PoisonedSet

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _test_sets(n: int = 40) -> tuple[ImageSet, PoisonedSet]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 10
    test = ImageSet(x, y, CLASSES)
    keep = torch.nonzero(y != 0).flatten()
    triggered = x[keep].clone()
    triggered[:, :, -3:, -3:] = 255
    bd = PoisonedSet(
        triggered,
        torch.zeros(len(keep), dtype=torch.long),
        CLASSES,
        is_poison=torch.ones(len(keep), dtype=torch.bool),
        y_orig=y[keep],
        src_index=keep,
    )
    return test, bd


def test_distinct_first_takes_one_per_class_then_fills() -> None:
    labels = torch.tensor([3, 3, 1, 3, 2, 1])
    assert distinct_first(labels, 3).tolist() == [0, 2, 4]
    assert distinct_first(labels, 5).tolist() == [0, 2, 4, 1, 3]
    assert distinct_first(torch.tensor([7, 7]), 8).tolist() == [0, 1]


def test_class_name_uses_names_else_numbers() -> None:
    assert class_name(CLASSES, 3) == "cat"
    assert class_name((), 3) == "3" and class_name(("a", ""), 1) == "1"


def test_trigger_grid_is_large_labelled_of_distinct_classes(tmp_path: Path) -> None:
    test, bd = _test_sets()
    path = trigger_grid(test, bd, tmp_path / "grid.png")
    image = Image.open(path)
    # 8 images of 32 px upscaled to at least MIN_SIZE each, two rows.
    assert image.width >= 8 * MIN_SIZE and image.height >= 2 * MIN_SIZE
    idx = distinct_first(bd.y_orig, 8)
    assert len(set(bd.y_orig[idx].tolist())) == 8
    # Same input, same bytes; no temporary file is left behind.
    again = trigger_grid(test, bd, tmp_path / "again.png")
    assert path.read_bytes() == again.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.png", "grid.png"]


def test_labels_change_pixels_and_upscaling_is_nearest() -> None:
    x = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    x[:, 0, 0, 0] = 255  # one red pixel per image
    blank = labelled_grid([x, x], ["clean", "triggered"], [["", ""], ["", ""]], "a note")
    labelled = labelled_grid([x, x], ["clean", "triggered"], [["cat", "dog"], ["a", "b"]], "a note")
    assert blank.size == labelled.size
    assert not np.array_equal(np.asarray(blank), np.asarray(labelled))
    # Nearest neighbour: each red pixel becomes a solid (MIN_SIZE / 8)-pixel square.
    arr = np.asarray(labelled).astype(int)
    red = (arr[..., 0] == 255) & (arr[..., 1] == 0) & (arr[..., 2] == 0)
    side = MIN_SIZE // 8
    assert red.sum() == 4 * side * side
    rows, cols = np.nonzero(red)
    assert red[rows.min() : rows.min() + side, cols.min() : cols.min() + side].all()


def test_poison_grid_says_when_every_poison_is_one_class(tmp_path: Path) -> None:
    test, _ = _test_sets()
    is_poison = test.y == 3
    poisoned = test.x.clone()
    poisoned[is_poison] //= 2
    train = PoisonedSet(
        poisoned, test.y.clone(), CLASSES, is_poison=is_poison, y_orig=test.y,
        src_index=torch.arange(len(test)),
    )  # fmt: skip
    note = poison_grid(test, train, tmp_path / "clean_label.png")
    relabelled = PoisonedSet(
        poisoned, torch.where(is_poison, 0, test.y), CLASSES, is_poison=is_poison,
        y_orig=test.y, src_index=torch.arange(len(test)),
    )  # fmt: skip
    other = poison_grid(test, relabelled, tmp_path / "dirty.png")
    assert note is not None and other is not None
    # The same images, but other captions and the clean-label note: other pixels.
    assert note.read_bytes() != other.read_bytes()
    nothing = PoisonedSet(
        test.x, test.y, CLASSES, is_poison=torch.zeros(len(test), dtype=torch.bool),
        y_orig=test.y, src_index=torch.arange(len(test)),
    )  # fmt: skip
    assert poison_grid(test, nothing, tmp_path / "none.png") is None


def test_inverted_triggers_are_upscaled(tmp_path: Path) -> None:
    from types import SimpleNamespace

    mask = torch.rand(1, 2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    inverted = SimpleNamespace(
        targets=torch.tensor([4]),
        budgets=(0.01, 0.05),
        mask=mask,
        pattern=mask.expand(1, 2, 3, 16, 16),
    )
    report = {"0.01": {"target": 4}, "0.05": {"target": 4}}
    image = Image.open(save_inverted_triggers(inverted, report, tmp_path / "inv.png"))
    assert image.width >= 2 * MIN_SIZE and image.height >= 2 * MIN_SIZE
