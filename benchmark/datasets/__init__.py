"""Dataset config entries: ``dataset=<name>`` is ``conf/dataset/<name>.yaml`` and
``benchmark/datasets/<name>.py``. Each module defines one ``Dataset`` subclass."""

from benchmark.datasets.base import Dataset

__all__ = ["Dataset"]
