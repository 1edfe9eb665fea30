"""Stratified, seeded index selection and the ImageSet type."""

from __future__ import annotations

import pytest
import torch

from benchmark.data import stratified_counts, stratified_indices, stratified_split, to_uint8
from benchmark.seeding import derive_seed, generator
from benchmark.types import ImageSet, PoisonedSet
from tests.conftest import toy_set


def test_stratified_counts_sum_and_proportions() -> None:
    counts = stratified_counts(torch.tensor([500, 300, 200]), 10)
    assert counts.tolist() == [5, 3, 2]
    odd = stratified_counts(torch.tensor([3, 3, 3]), 4)
    assert int(odd.sum()) == 4 and odd.max() - odd.min() <= 1


def test_stratified_indices_are_seeded_sorted_and_stratified() -> None:
    y = torch.arange(1000) % 10
    a = stratified_indices(y, 100, 10, generator(0, "x"))
    b = stratified_indices(y, 100, 10, generator(0, "x"))
    c = stratified_indices(y, 100, 10, generator(1, "x"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, torch.sort(a).values) and a.unique().numel() == 100
    assert torch.bincount(y[a], minlength=10).tolist() == [10] * 10


def test_stratified_split_is_disjoint_and_complete() -> None:
    data = toy_set(200, 4)
    first, rest = stratified_split(data, 20, generator(0, "s"))
    assert len(first) == 20 and len(rest) == 180
    assert set(first.tolist()).isdisjoint(rest.tolist())
    assert torch.bincount(data.y[first]).tolist() == [5, 5, 5, 5]


def test_derive_seed_depends_on_every_name() -> None:
    assert derive_seed(0, "a") == derive_seed(0, "a")
    assert (
        len({derive_seed(0, "a"), derive_seed(1, "a"), derive_seed(0, "b"), derive_seed(0, "a", 1)})
        == 4
    )


def test_imageset_rejects_wrong_dtypes_and_subsets_every_field() -> None:
    with pytest.raises(TypeError):
        ImageSet(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), ("a",))
    data = toy_set(10, 2)
    p = PoisonedSet(
        data.x,
        data.y,
        data.classes,
        is_poison=torch.arange(10) < 3,
        y_orig=data.y.clone(),
        src_index=torch.arange(10),
    )
    sub = p.subset(torch.tensor([0, 5]))
    assert isinstance(sub, PoisonedSet) and sub.src_index.tolist() == [0, 5]
    assert sub.is_poison.tolist() == [True, False]
    view = p.clean_view()
    assert type(view) is ImageSet and not hasattr(view, "is_poison")


def test_to_uint8_rounds_and_clamps() -> None:
    x = torch.tensor([-0.1, 0.0, 0.5, 1.0, 1.2])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]
