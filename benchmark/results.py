"""Results records: ``metrics.json`` per run, provenance, the printed table, the trigger grid.

Each run writes one ``metrics.json`` into its own Hydra run directory (never a shared file, so
parallel jobs cannot clash). The layout::

    {"status": "complete" | "failed", "error": null | str,
     "choices": {"dataset", "model", "attack", "defense", "train", ...}, "seed": int,
     "backdoored": {"clean_acc", "asr", "ra"},
     "defended": {"clean_acc", "asr", "ra", "det_tpr", "det_fpr", "det_precision",
                  "det_auroc", "der"},
     "counts": {"backdoored" | "defended": {"clean_correct", "n_clean", "asr_hits",
                                            "ra_correct", "n_backdoor"}},
     "detection": {"det_*": the rates above and their counts (det_tp, det_fp, ...)},
     "attack": {...}, "data": {...}, "defense_extras": {...},
     "timing": {"<stage>_s": ...}, "memory": {...}, "cache": {...}, "provenance": {...}}

Rates are fractions in [0, 1], exact ``count / total`` of the integer ``counts`` beside them;
``det_*`` are null when the defense detects nothing.
"""

from __future__ import annotations

import datetime as dt
import platform
import resource
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from benchmark.io import atomic_write_json
from benchmark.pictures import labelled_grid, save_png
from benchmark.recipe import bf16_native

STAGE_KEYS = ("clean_acc", "asr", "ra")
DEFENDED_KEYS = (*STAGE_KEYS, "det_tpr", "det_fpr", "det_precision", "det_auroc", "der")
PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "hydra-core",
    "omegaconf",
    "numpy",
    "pandas",
    "wandb",
    "backdoor-bench",
)


def empty_record(choices: dict[str, Any], seed: int) -> dict[str, Any]:
    """A record with every canonical key, metrics null, status failed until completed."""
    return {
        "status": "failed",
        "error": None,
        "choices": choices,
        "seed": seed,
        "backdoored": dict.fromkeys(STAGE_KEYS),
        "defended": dict.fromkeys(DEFENDED_KEYS),
        "counts": {},
        "attack": {},
        "data": {},
        "defense_extras": {},
        "timing": {},
        "memory": {},
        "cache": {},
        "provenance": {},
    }


def write_record(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``metrics.json`` atomically and return its path."""
    path = Path(run_dir) / "metrics.json"
    atomic_write_json(path, record)
    return path


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            text=True,
            capture_output=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def provenance(device: torch.device, overrides: list[str]) -> dict[str, Any]:
    """Git commit and dirty flag, package versions, overrides, device, time, host, and what
    decides the arithmetic: the CPU's model and vector ISA (oneDNN's AVX2 and AVX-512 kernels
    round differently) and whether bf16 is native (``train.amp: auto`` then trains in bf16)."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "python": sys.version.split()[0],
        "versions": versions,
        "overrides": list(overrides),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16_native(device),
        "torch_threads": torch.get_num_threads(),
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (else its architecture): what every record and
    benchmark file names its machine by."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model() or platform.machine()


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is "x86_64" on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def memory_usage(device: torch.device) -> dict[str, float | None]:
    """Peak resident memory of this process and peak CUDA memory, in MiB."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "peak_rss_mb": round(rss_kib / 1024, 1),
        "peak_gpu_mb": round(gpu, 1) if gpu is not None else None,
    }


def result_table(record: dict[str, Any]) -> pd.DataFrame:
    """Stage rows (backdoored, defended) x metric columns, as printed after a run."""
    rows = {"backdoored": record["backdoored"], "defended": record["defended"]}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    return frame.dropna(axis=1, how="all")


def format_table(record: dict[str, Any]) -> str:
    c = record["choices"]
    title = (
        f"attack={c.get('attack')} defense={c.get('defense')} dataset={c.get('dataset')} "
        f"model={c.get('model')} seed={record['seed']}"
    )
    table = result_table(record).to_string(float_format=lambda v: f"{v:.4f}", na_rep="-")
    return title + "\n" + table


def save_trigger_grid(
    clean: Tensor,
    triggered: Tensor,
    path: str | Path,
    *,
    row_labels: Sequence[str] = ("clean", "triggered"),
    captions: Sequence[Sequence[str]] | None = None,
    note: str | None = None,
) -> Path:
    """Save a two-row PNG of uint8 images: ``clean`` on top, their triggered versions below,
    upscaled and labelled (:func:`benchmark.pictures.labelled_grid`)."""
    image = labelled_grid([clean, triggered], row_labels, captions, note)
    return save_png(image, path)


def save_inverted_triggers(inverted: Any, report: dict[str, Any], path: str | Path) -> Path:
    """Save the chosen inverted trigger of each budget: mask x pattern on top, the mask below
    (one column per budget, smallest first). ``inverted`` is an ``InvertedTriggers``."""
    targets = [int(t) for t in inverted.targets]
    tops, bottoms, captions = [], [], []
    for b_i, budget in enumerate(inverted.budgets):
        target = int(report[f"{budget:g}"]["target"])
        t_i = targets.index(target)
        mask, pattern = inverted.mask[t_i, b_i].float(), inverted.pattern[t_i, b_i].float()
        tops.append(mask * pattern)
        bottoms.append(mask.expand_as(pattern))
        captions.append(f"budget {budget:g}\ntarget {target}")
    as_uint8 = lambda ts: (torch.stack(ts).clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731
    return save_trigger_grid(
        as_uint8(tops),
        as_uint8(bottoms),
        path,
        row_labels=("mask x pattern", "mask"),
        captions=[captions, [""] * len(captions)],
    )
