"""The dataset interface: cheap metadata at construction, tensors on ``load()``.

A ``Dataset`` object is what ``instantiate(cfg.dataset)`` returns. Construction must be cheap
(no decoding of images) so the runner can validate the whole config before any expensive work;
``prepare()`` makes the files available or fails with one clear message; ``load()`` returns the
train and test splits as ``ImageSet``s, reduced to ``max_train``/``max_test`` by a stratified
subset drawn from ``seed`` (the dataset's own seed, so the data do not change with the run seed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from benchmark.checks import Checks
from benchmark.data import stratified_indices
from benchmark.errors import ConfigError
from benchmark.seeding import generator
from benchmark.types import ImageSet

checks = Checks("dataset")


class Dataset(ABC):
    """Base class of every dataset config entry.

    Subclasses set these attributes (as class attributes, or in ``__init__`` when they depend on
    the files, e.g. the number of classes of an image folder):

    Attributes:
        name: the config name (``dataset=<name>``).
        num_classes: number of classes.
        image_shape: ``(C, H, W)`` of every image.
        mean, std: per-channel normalisation statistics, used inside the model's ``forward``;
            folder datasets may compute them from the training images, so they can be None
            until ``load()`` (the runner builds models only after loading).
        hflip: whether a horizontal flip keeps an image's label (False for digits and signs).
        crop_padding: padding of the random-crop augmentation, in pixels.
        train_size, test_size: sizes of the full splits, known without loading the images.
    """

    name: ClassVar[str]
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    hflip: bool = False
    crop_padding: int = 4
    train_size: int
    test_size: int

    def __init__(
        self,
        *,
        max_train: int | None = None,
        max_test: int | None = None,
        seed: int = 0,
        hflip: bool | None = None,
        crop_padding: int | None = None,
    ) -> None:
        self.max_train = max_train
        self.max_test = max_test
        self.seed = seed
        # Per-instance overrides of the class defaults (e.g. ``dataset.hflip=false``).
        if hflip is not None:
            checks.boolean(hflip, "hflip")
            self.hflip = hflip
        if crop_padding is not None:
            checks.integer(crop_padding, "crop_padding", 0)
            self.crop_padding = crop_padding

    def validate(self) -> None:
        """Check the classes and size limits against the metadata; raise ``ConfigError``.

        A limit larger than its split is an error, not a silent clamp: it would describe the
        same data as ``null`` under another config digest and cache key, so the same model
        would be trained, and counted in tables, twice.
        """
        if self.num_classes < 2:
            raise ConfigError(
                "dataset",
                f"{self.name} has {self.num_classes} class(es); a classifier (and an attack's "
                "target) needs at least 2",
            )
        splits = (
            ("max_train", self.max_train, self.train_size, "training"),
            ("max_test", self.max_test, self.test_size, "test"),
        )
        for key, limit, size, split in splits:
            if limit is None:
                continue
            checks.require(checks.is_int(limit), key, "an integer or null", limit)
            if limit > size:
                raise ConfigError(
                    f"dataset.{key}",
                    f"= {limit} is larger than the {split} split ({size} images); use "
                    f"dataset.{key}=null for the whole split or a value <= {size}",
                )
            if limit < self.num_classes:
                raise ConfigError(
                    f"dataset.{key}",
                    f"= {limit} is smaller than the number of "
                    f"classes ({self.num_classes}); a stratified subset needs at "
                    "least one image per class",
                )

    @property
    def n_train(self) -> int:
        """Size of the training split after ``max_train``."""
        return self.train_size if self.max_train is None else min(self.max_train, self.train_size)

    @property
    def n_test(self) -> int:
        """Size of the test split after ``max_test``."""
        return self.test_size if self.max_test is None else min(self.max_test, self.test_size)

    def prepare(self) -> None:
        """Make the files available (download where allowed) or raise ``DatasetUnavailable``."""

    @abstractmethod
    def load_full(self) -> tuple[ImageSet, ImageSet]:
        """The full (train, test) splits as uint8 ``ImageSet``s on the CPU."""

    def load(self) -> tuple[ImageSet, ImageSet]:
        """``prepare()``, then the (train, test) splits cut to ``max_train``/``max_test``."""
        self.prepare()
        train, test = self.load_full()
        if self.max_train is not None and self.max_train < len(train):
            gen = generator(self.seed, "dataset", self.name, "max_train")
            index = stratified_indices(train.y, self.max_train, train.num_classes, gen)
            train = train.subset(index)
        if self.max_test is not None and self.max_test < len(test):
            gen = generator(self.seed, "dataset", self.name, "max_test")
            test = test.subset(stratified_indices(test.y, self.max_test, test.num_classes, gen))
        return train, test

    def describe(self) -> dict[str, object]:
        """Metadata for logs and the model constructor."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "n_train": self.n_train,
            "n_test": self.n_test,
        }
