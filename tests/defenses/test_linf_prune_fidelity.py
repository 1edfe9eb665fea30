"""l-inf pruning's channel order against an independent reference computation.

No official code exists for l-inf pruning (Cheng et al., arXiv 2002.12162; the methods notes and
the fidelity review searched the code and page corpora). ``fixtures/linf_prune_reference.json``
is therefore an independent float64 numpy computation (``/work/scratch/h1/linf_fixture.py``:
its own small_cnn forward, max |A| per channel, mean over images, stable sorts) on
``fixtures/fidelity_inputs.py:linf_inputs()`` with the fixed stand-in trigger of
``linf_trigger()`` in place of the inversion's output. The project's ``LinfPrune.rank`` runs on
the same input with ``invert_triggers`` replaced by that stand-in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import defenses.linf_prune as linf_prune
from attacks.inversion import InvertedTriggers
from benchmark.types import ImageSet
from defenses.linf_prune import LinfPrune
from defenses.prune_sites import find_site
from tests.defenses.fixtures.fidelity_inputs import (
    LINF_TARGET,
    linf_inputs,
    linf_trigger,
    sha256_of,
)

REF = json.loads((Path(__file__).parent / "fixtures" / "linf_prune_reference.json").read_text())
# Mean l-inf scores: float32 here, float64 in the reference; values up to ~2.3, measured max
# difference 2.6e-7. 2e-6 covers float32 rounding with room and is below half the smallest gap
# between two distinct scores of every ranking (9.2e-6, asserted), so the orders must match.
ATOL = 2e-6


@pytest.fixture(scope="module")
def inputs() -> tuple[Any, ...]:
    x, y, model = linf_inputs()
    mask, pattern, fit = linf_trigger()
    assert sha256_of(x, y, model, mask, pattern, fit) == REF["inputs_sha256"], "inputs drifted"
    data = ImageSet(x, y, tuple(str(c) for c in range(10)))
    return data, model, mask, pattern, fit


@pytest.mark.parametrize("ranking", ["clean_asc", "inverted_desc", "inverted_diff_desc"])
def test_channel_order_equals_the_reference(
    inputs: Any, ranking: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, model, mask, pattern, fit = inputs
    calls: list[dict[str, Any]] = []

    def stand_in(net: Any, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> InvertedTriggers:
        calls.append({"x": x, "y": y, **kw})
        return InvertedTriggers(torch.arange(10), tuple(kw["budgets"]), mask, pattern, fit)

    monkeypatch.setattr(linf_prune, "invert_triggers", stand_in)
    ref = REF["rankings"][ranking]
    distinct = np.diff(np.unique(np.round(ref["scores"], 12)))
    assert distinct.min() > 2 * ATOL, distinct.min()  # no near-tie the tolerance could flip
    site = find_site(model)
    assert site.name == "block3.2" and site.channels == len(ref["order"])
    got = LinfPrune(ranking=ranking).rank(
        model, site, data, num_classes=10, device=torch.device("cpu"), seed=0
    )
    np.testing.assert_allclose(got.scores.double().numpy(), ref["scores"], rtol=0, atol=ATOL)
    assert got.order.tolist() == ref["order"]
    if ranking == "clean_asc":
        assert not calls and got.target is None
    else:
        assert got.target == REF["target"] == LINF_TARGET  # highest fit ASR, lower class on ties
        (call,) = calls  # one inversion, on the reserve only, every class a candidate
        assert torch.equal(call["x"], data.x) and torch.equal(call["y"], data.y)
        assert call["targets"] == list(range(10))


def test_the_default_ranking_is_the_inverted_trigger() -> None:
    assert LinfPrune().ranking == "inverted_desc"
