"""The attack interface: poison a training set, trigger a test batch.

An attack is a config entry (``attack=<name>`` -> ``conf/attack/<name>.yaml`` ->
``attacks/<name>.py``). It sees pixels in [0, 1] and works on whole batches. The two operations
are separate (backdoor-toolbox's good idea):

- ``poison(train, gen)``: a ``PoisonedSet`` with triggered images (stored as uint8), changed
  labels for dirty-label attacks, and the ground truth (``is_poison``, ``y_orig``,
  ``src_index``) that only the runner reads. Indices are drawn from ``gen`` alone.
- ``apply_trigger(x, index)``: the trigger on a float batch, used for poisoning and for the test
  set. ``index`` holds each sample's position in its set (the training set the attack poisons,
  or the test split), the same however the set is chunked, so sample-specific triggers (a
  random position per image, per-image residuals) are deterministic per sample.

Definitions (also in the README): ``poison_rate`` is the fraction of the whole training set
that is poisoned (the set the model trains on, after the defender's clean reserve is carved
out). Dirty-label samples are drawn from every class, target class included (BackdoorBench).
The backdoor test set holds every test image whose true label is not the target (all-to-one)
or every test image (all-to-all, where each label maps to another class).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from attacks.context import AttackContext, StageContext, StageTest
from benchmark.checks import Checks
from benchmark.data import to_float, to_uint8
from benchmark.errors import ConfigError
from benchmark.types import ImageSet, PoisonedSet

if TYPE_CHECKING:
    from benchmark.datasets.base import Dataset

Mode = Literal["all2one", "all2all"]
_CHUNK = 4096  # samples triggered at once, to bound memory on large sets
checks = Checks("attack")


class Attack(ABC):
    """Base class of every attack.

    Args:
        target_class: the target label of an all-to-one attack.
        poison_rate: fraction of the training set that is poisoned, in (0, 1].
        mode: ``all2one`` (every triggered input -> ``target_class``) or ``all2all``
            (label ``y`` -> ``(y + 1) mod K``).
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # "dirty_label" | "clean_label" | "training_control" | "natural"
    controls_training: ClassVar[bool] = False
    # The backdoor test set depends on the evaluated model (``natural`` inverts its trigger
    # from each model): ``stage_backdoor_test`` runs again for a defended model.
    model_dependent: ClassVar[bool] = False
    modes: ClassVar[tuple[str, ...]] = ("all2one", "all2all")

    def __init__(
        self, target_class: int = 0, poison_rate: float = 0.1, mode: Mode = "all2one"
    ) -> None:
        checks.integer(target_class, "target_class", 0)
        checks.number(poison_rate, "poison_rate", 0.0, 1.0, low_open=True)
        checks.one_of(mode, "mode", self.modes)
        self.target_class = target_class
        self.poison_rate = float(poison_rate)
        self.mode = mode
        self.num_classes: int | None = None

    # -- validation, before any data is loaded ------------------------------------------------
    def validate(self, num_classes: int, image_shape: tuple[int, int, int], n_train: int) -> None:
        """Check the settings against the dataset's metadata; raise ``ConfigError``.

        Args:
            num_classes: classes of the dataset.
            image_shape: ``(C, H, W)``.
            n_train: size of the training set the attack will poison.
        """
        if self.target_class >= num_classes:
            raise ConfigError(
                "attack.target_class",
                f"= {self.target_class} is not a class of this dataset (0..{num_classes - 1})",
            )
        if self.mode == "all2all" and num_classes < 2:
            raise ConfigError("attack.mode", "all2all needs at least two classes")
        if self.num_poison(n_train) < 1:
            raise ConfigError(
                "attack.poison_rate",
                f"= {self.poison_rate} poisons no sample of a training set of {n_train}",
            )
        self.num_classes = num_classes

    def num_poison(self, n: int) -> int:
        """Poisoned samples in a training set of ``n``: ``round(poison_rate * n)``."""
        return math.floor(self.poison_rate * n + 0.5)

    # -- the trigger --------------------------------------------------------------------------
    def prepare(
        self, train: ImageSet, gen: torch.Generator, ctx: AttackContext | None = None
    ) -> None:
        """Build trigger state that depends on the data (e.g. a key image); default: none.

        ``ctx`` lends surrogate models and a cache to attacks that need them (label-consistent).
        """

    @abstractmethod
    def apply_trigger(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """The trigger on float pixels ``(N, C, H, W)`` in [0, 1]; same shape, dtype, range.

        ``index``: ``(N,)`` int64, each sample's position in the set it comes from (the
        training set for poisoning, the test split for the backdoor test set), or ``None``
        where no set is behind the batch (a training-controlled attack's ``batch_hook``).
        Sample-agnostic triggers ignore it; a sample-specific one derives each sample's
        trigger from it (and its own seeded state) and raises where it needs it.
        """

    def target_labels(self, y: Tensor) -> Tensor:
        """The labels a triggered input should get."""
        if self.mode == "all2all":
            if self.num_classes is None:
                raise RuntimeError("validate() must run before all2all labels are known")
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.target_class)

    def trigger_uint8(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """``apply_trigger`` on uint8 images, quantised back to uint8 (as stored files are),
        ``_CHUNK`` samples at a time; each chunk gets its slice of ``index`` (the samples'
        positions in their set, not in the chunk)."""
        if index is not None and tuple(index.shape) != (x.shape[0],):
            raise ValueError(f"index has shape {tuple(index.shape)}, expected ({x.shape[0]},)")
        out = torch.empty_like(x)
        for i in range(0, x.shape[0], _CHUNK):
            part = None if index is None else index[i : i + _CHUNK]
            out[i : i + _CHUNK] = to_uint8(self.apply_trigger(to_float(x[i : i + _CHUNK]), part))
        return out

    def poison_images(self, x: Tensor, index: Tensor) -> Tensor:
        """The stored poisoned training images (uint8) for the training images ``x`` at
        ``index``; default: the trigger. Clean-label attacks may perturb them first."""
        return self.trigger_uint8(x, index)

    def train_augment(self, dataset: Dataset) -> Callable[[Tensor, torch.Generator], Tensor] | None:
        """The backdoor training's augmentation where the attack brings its own (WaNet's
        ``augment: backdoorbench``); default None: the dataset's crop + flip."""
        return None

    def batch_hook(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Training-controlled attacks (``controls_training = True``) poison each batch here,
        on float pixels before augmentation; data-poisoning attacks do not use it."""
        raise NotImplementedError(f"{type(self).__name__} does not control training")

    # -- poisoning ----------------------------------------------------------------------------
    def select(self, train: ImageSet, gen: torch.Generator) -> Tensor:
        """Sorted indices of the samples to poison: ``num_poison`` drawn from the whole set."""
        n = len(train)
        return torch.sort(torch.randperm(n, generator=gen)[: self.num_poison(n)]).values

    def poison(self, train: ImageSet, gen: torch.Generator) -> PoisonedSet:
        """A poisoned copy of ``train``; ``train`` itself is never modified."""
        idx = self.select(train, gen).to(train.device)
        x, y = train.x.clone(), train.y.clone()
        x[idx] = self.poison_images(train.x[idx], idx)
        if self.kind != "clean_label":
            y[idx] = self.target_labels(train.y[idx])
        is_poison = torch.zeros(len(train), dtype=torch.bool, device=train.device)
        is_poison[idx] = True
        return PoisonedSet(
            x,
            y,
            train.classes,
            is_poison=is_poison,
            y_orig=train.y.clone(),
            src_index=torch.arange(len(train), device=train.device),
        )

    def backdoor_test_set(self, test: ImageSet) -> PoisonedSet:
        """Triggered test images whose true label is not the target, labelled as the attack
        wants them; ``y_orig`` keeps the true labels (for robust accuracy)."""
        if self.mode == "all2one":
            keep = torch.nonzero(test.y != self.target_class).flatten()
        else:
            keep = torch.arange(len(test), device=test.device)
        src = test.subset(keep)
        return PoisonedSet(
            self.trigger_uint8(src.x, keep),
            self.target_labels(src.y),
            test.classes,
            is_poison=torch.ones(len(src), dtype=torch.bool, device=test.device),
            y_orig=src.y.clone(),
            src_index=keep,
        )

    def stage_backdoor_test(self, test: ImageSet, model: nn.Module, ctx: StageContext) -> StageTest:
        """The backdoor test set the runner evaluates ``model`` of ``ctx.stage`` on; default:
        ``backdoor_test_set(test)``, the same for every model. Called after the trigger state
        of a cached backdoored model is restored."""
        return StageTest(self.backdoor_test_set(test))

    # -- state saved with the cached backdoored model -----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Trigger state (tensors and plain values) needed to rebuild the exact trigger."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""

    def describe(self, n_train: int) -> dict[str, Any]:
        """Scalars for the results record."""
        return {
            "attack_kind": self.kind,
            "target_class": self.target_class,
            "mode": self.mode,
            "poison_rate": self.poison_rate,
            "n_poison": self.num_poison(n_train),
        }


RateOf = Literal["target_class", "train_set"]


class CleanLabelAttack(Attack):
    """Base of the clean-label attacks: only target-class images are poisoned, labels are kept.

    ``poison_rate`` is a fraction of the target class by default (Turner et al., BackdoorBox,
    ART); ``rate_of: train_set`` reads it as a fraction of the whole training set, as
    BackdoorBench's ``pratio`` does (0.1 of CIFAR-10 = the whole target class). The record holds
    both shares (``poison_rate_of_target``, ``poison_rate_of_train``). A share larger than the
    target class is an error, raised when the data are loaded, before any training.

    Args:
        target_class: the target label.
        poison_rate: the poisoned share, of the target class or of the training set.
        mode: only ``all2one`` (a clean-label poison cannot map every class to another).
        rate_of: ``target_class`` or ``train_set``: what ``poison_rate`` is a fraction of.
    """

    kind: ClassVar[str] = "clean_label"
    modes: ClassVar[tuple[str, ...]] = ("all2one",)

    def __init__(
        self,
        target_class: int = 0,
        poison_rate: float = 0.5,
        mode: Mode = "all2one",
        rate_of: RateOf = "target_class",
    ) -> None:
        super().__init__(target_class, poison_rate, mode)
        checks.one_of(rate_of, "rate_of", ("target_class", "train_set"))
        self.rate_of = rate_of
        self.n_target: int | None = None  # target-class samples of the training set

    def validate(self, num_classes: int, image_shape: tuple[int, int, int], n_train: int) -> None:
        if self.target_class >= num_classes:
            raise ConfigError(
                "attack.target_class",
                f"= {self.target_class} is not a class of this dataset (0..{num_classes - 1})",
            )
        if self.rate_of == "train_set" and self.num_poison(n_train) < 1:
            raise ConfigError(
                "attack.poison_rate",
                f"= {self.poison_rate} poisons no sample of a training set of {n_train}",
            )
        self.num_classes = num_classes

    def num_poison(self, n: int) -> int:
        """``round(poison_rate * n)`` for ``rate_of: train_set``, else ``round(poison_rate *
        n_target)`` (known once ``prepare`` has seen the data)."""
        if self.rate_of == "train_set":
            return math.floor(self.poison_rate * n + 0.5)
        if self.n_target is None:
            raise RuntimeError("prepare() must see the data before the poison count is known")
        return math.floor(self.poison_rate * self.n_target + 0.5)

    def prepare(
        self, train: ImageSet, gen: torch.Generator, ctx: AttackContext | None = None
    ) -> None:
        self.n_target = int((train.y == self.target_class).sum())
        wanted = self.num_poison(len(train))
        if wanted > self.n_target:
            raise ConfigError(
                "attack.poison_rate",
                f"= {self.poison_rate} of the training set asks for {wanted} poisoned images, "
                f"but the target class {self.target_class} has only {self.n_target}; a "
                "clean-label attack can only poison target-class images (lower it, or use "
                "rate_of=target_class)",
            )
        if wanted < 1:
            raise ConfigError(
                "attack.poison_rate",
                f"= {self.poison_rate} poisons none of the {self.n_target} target-class images",
            )

    def select(self, train: ImageSet, gen: torch.Generator) -> Tensor:
        """Sorted indices of ``num_poison`` target-class samples, drawn at random."""
        members = torch.nonzero(train.y.cpu() == self.target_class).flatten()
        n = self.num_poison(len(train))
        return torch.sort(members[torch.randperm(members.numel(), generator=gen)[:n]]).values

    def describe(self, n_train: int) -> dict[str, Any]:
        out = super().describe(n_train)
        n_poison = out["n_poison"]
        out.update(
            rate_of=self.rate_of,
            n_target_class=self.n_target,
            poison_rate_of_target=n_poison / self.n_target if self.n_target else None,
            poison_rate_of_train=n_poison / n_train if n_train else None,
        )
        return out
