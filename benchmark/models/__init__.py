"""Model config entries: ``model=<name>`` is ``conf/model/<name>.yaml`` and
``benchmark/models/<name>.py``. Every model is an ``ImageClassifier``;
``benchmark/models/trace.py`` is the tracer the models and defenses share."""

from benchmark.models.base import ActivationSite, ConvSite, ImageClassifier

__all__ = ["ActivationSite", "ConvSite", "ImageClassifier"]
