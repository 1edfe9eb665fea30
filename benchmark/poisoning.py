"""The data stage: load the splits, carve out the defender's clean reserve, poison the rest.

The backdoor test set is not built here: it comes from the attack after the model stage has
restored a cached attack's trigger state (``Attack.stage_backdoor_test``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from benchmark.attack_services import attack_context
from benchmark.build import Components
from benchmark.data import stratified_split
from benchmark.seeding import generator
from benchmark.train import place
from benchmark.types import ImageSet, PoisonedSet


@dataclass
class Data:
    """The run's data: the clean reserve, the poisoned training set and the clean test set.

    ``benign`` is the training set before poisoning (training-controlled attacks train on it
    through their batch hook). ``attack_artifacts`` logs the surrogates and cached artefacts
    the attack used while poisoning.
    """

    reserve: ImageSet
    reserve_index: torch.Tensor  # into the dataset's training split
    train_index: torch.Tensor  # into the dataset's training split, in ``train`` order
    benign: ImageSet
    train: PoisonedSet
    test: ImageSet
    attack_artifacts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def poison_index(self) -> torch.Tensor:
        """Indices of the poisoned samples of ``train``, on the CPU."""
        return torch.nonzero(self.train.is_poison.cpu()).flatten()


def load_data(cfg: DictConfig, comp: Components) -> Data:
    """Load the splits, carve out the clean reserve, prepare the attack and poison the rest.

    The images go to the training device when they fit, so triggers run there too.
    """
    full_train, test = comp.dataset.load()
    full_train, test = place(full_train, comp.device), place(test, comp.device)
    reserve_idx, train_idx = stratified_split(
        full_train, round(comp.clean_fraction * len(full_train)), generator(cfg.seed, "reserve")
    )
    reserve, benign = full_train.subset(reserve_idx), full_train.subset(train_idx)
    ctx, artifacts = attack_context(cfg, comp, benign)
    comp.attack.prepare(benign, generator(cfg.seed, "attack", "prepare"), ctx)
    poisoned = comp.attack.poison(benign, generator(cfg.seed, "poison"))
    return Data(reserve, reserve_idx, train_idx, benign, poisoned, test, artifacts)
