"""What test_nad.py and test_i_bau.py share for their slow "it works" runs: the backdoored
mnist5k model of ``filter_toys`` (cached, so test_ac/test_ss/test_nad/test_i_bau train it once
per session), a clean reserve and an evaluation split, and CA/ASR measured by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from attacks.badnets import BadNets
from benchmark.datasets.mnist5k import MNIST5k
from benchmark.train import fit, predict
from benchmark.types import ImageSet
from defenses.base import DefenseContext
from tests.defenses.filter_toys import WORKS_RECIPE, backdoored_mnist5k

N_RESERVE = 300  # 300 random test digits: the reserve; the others evaluate


def splits() -> tuple[ImageSet, ImageSet]:
    """(reserve, evaluation): disjoint halves of the mnist5k test split, never trained on."""
    _, test = MNIST5k(max_train=1500, seed=0).load()
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))  # sorted by class
    return test.subset(idx[:N_RESERVE]), test.subset(idx[N_RESERVE:])


def ca_asr(model: nn.Module, data: ImageSet) -> tuple[float, float]:
    """Clean accuracy and BadNets ASR (non-target images, 3x3 white square, target 0)."""
    model.eval()
    ca = float((predict(model, data.x, batch_size=256) == data.y).float().mean())
    src = data.x[data.y != 0]
    triggered = (BadNets().apply_trigger(src.float() / 255.0) * 255).round().to(torch.uint8)
    asr = float((predict(model, triggered, batch_size=256) == 0).float().mean())
    return ca, asr


def works_ctx(tmp_path: Path, **recipe: Any) -> tuple[DefenseContext, ImageSet]:
    """A context around the cached backdoored model with the reserve, and the evaluation set."""
    model, poisoned = backdoored_mnist5k()
    reserve, evaluation = splits()
    base = OmegaConf.create({**WORKS_RECIPE, **recipe, "amp": False, "channels_last": False})

    def run_fit(m: nn.Module, data: ImageSet, **kw: Any) -> Any:
        return fit(m, data, **{"recipe": base, "progress": False, **kw})

    ctx = DefenseContext(
        train_set=poisoned.clean_view(), clean_set=reserve, model=model, num_classes=10,
        fit=run_fit, new_model=lambda: model, seed=0, device=torch.device("cpu"),
        work_dir=tmp_path, recipe=base,
    )  # fmt: skip
    return ctx, evaluation
