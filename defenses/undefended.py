"""``defense=undefended``: the no-defense baseline; returns the trained model unchanged.

Not to be confused with ``defense=NONE``, the defense of "Training with More Confidence"
(Wang et al., NeurIPS 2022).
"""

from __future__ import annotations

from typing import ClassVar

from defenses.base import Defense, DefenseContext, DefenseResult, Stage


class Undefended(Defense):
    """The baseline row of every table: the backdoored model as it is."""

    name: ClassVar[str] = "undefended"
    stage: ClassVar[Stage] = Stage.POST_TRAINING

    def run(self, ctx: DefenseContext) -> DefenseResult:
        assert ctx.model is not None, "post-training defenses receive the trained model"
        return DefenseResult(model=ctx.model)
