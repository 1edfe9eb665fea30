"""The base class's plumbing of each sample's index to ``apply_trigger`` (issue 14, part 2)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from attacks.base import Attack
from benchmark.seeding import generator
from tests.conftest import toy_set


class IndexStamp(Attack):
    """A sample-specific trigger: writes the sample's index into the first pixels (base 256),
    so every triggered image says which index ``apply_trigger`` got for it."""

    name = "index_stamp"
    kind = "dirty_label"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[int] = []

    def apply_trigger(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        if index is None:
            raise RuntimeError("index_stamp needs each sample's index")
        self.calls.append(x.shape[0])
        out = x.clone()
        out[:, 0, 0, 0] = (index % 256).to(x.dtype) / 255.0
        out[:, 0, 0, 1] = (index // 256).to(x.dtype) / 255.0
        return out


def stamped(images: Tensor) -> Tensor:
    """The index written by ``IndexStamp`` into uint8 images."""
    return images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()


def test_chunks_get_the_global_index_not_the_chunk_position(monkeypatch) -> None:
    monkeypatch.setattr("attacks.base._CHUNK", 64)
    attack = IndexStamp()
    x = toy_set(300, 4, (3, 8, 8)).x
    index = torch.arange(300) * 3 + 1000
    out = attack.trigger_uint8(x, index)
    assert attack.calls == [64, 64, 64, 64, 44]
    assert torch.equal(stamped(out), index)


def test_poisoned_samples_get_their_training_set_index() -> None:
    attack = IndexStamp(poison_rate=0.2)
    train = toy_set(200, 4, (3, 8, 8))
    attack.validate(4, (3, 8, 8), len(train))
    poisoned = attack.poison(train, generator(0, "poison"))
    idx = torch.nonzero(poisoned.is_poison).flatten()
    assert len(idx) == 40
    assert torch.equal(stamped(poisoned.x[idx]), idx)


def test_backdoor_test_samples_get_their_test_index() -> None:
    attack = IndexStamp(target_class=1)
    test = toy_set(120, 4, (3, 8, 8), seed=2)
    attack.validate(4, (3, 8, 8), 1000)
    bd = attack.backdoor_test_set(test)
    assert torch.equal(stamped(bd.x), bd.src_index)
    assert (test.y[bd.src_index] != 1).all() and len(bd) == 90


def test_index_shape_is_checked() -> None:
    x = toy_set(10, 2, (3, 8, 8)).x
    with pytest.raises(ValueError, match=r"expected \(10,\)"):
        IndexStamp().trigger_uint8(x, torch.arange(9))
