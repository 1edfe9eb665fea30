"""What NONE records of its rounds: the round report, the run's extras, ``none_rounds.pt``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from benchmark.io import atomic_torch_save
from defenses.none_reset import ResetSite


@dataclass
class RoundReport:
    """What one round found and did (saved to ``work_dir/none_rounds.pt``)."""

    scores: dict[str, Tensor]
    reset: dict[str, Tensor]
    detect: dict[str, Tensor]
    u: Tensor
    flags: Tensor
    threshold: float | None
    no_confident: int
    analysis_s: float
    finetune_s: float = 0.0
    n_finetune: int = 0
    finetune_acc: float | None = None


def save_rounds(sites: list[ResetSite], reports: list[RoundReport], path: Path) -> None:
    """The per-layer channel scores, resets, detection channels and flags of every round."""
    atomic_torch_save(
        {
            "layers": [s.name for s in sites],
            "rounds": [
                {
                    "scores": rep.scores,
                    "reset": rep.reset,
                    "detect": rep.detect,
                    "u": rep.u,
                    "flags": rep.flags,
                    "threshold": rep.threshold,
                }
                for rep in reports
            ],
        },
        path,
    )


def round_extras(
    sites: list[ResetSite],
    per_layer: dict[str, int],
    no_consumer: list[str],
    reports: list[RoundReport],
) -> dict[str, Any]:
    """The plain-scalar ``extras`` of a NONE run (see ``defenses/none.py``)."""
    extras: dict[str, Any] = {
        "monitored_layers": len(sites),
        "monitored_channels": sum(s.channels for s in sites),
        "reset_per_layer": ",".join(f"{k}:{v}" for k, v in per_layer.items()),
        "layers_without_consumer": len(no_consumer),
        "layers_without_consumer_names": ",".join(no_consumer),
        "rounds": len(reports),
    }
    for r, rep in enumerate(reports, start=1):
        extras.update(
            {
                f"round{r}_reset_channels": sum(int(v.numel()) for v in rep.reset.values()),
                f"round{r}_n_flagged": int(rep.flags.sum()),
                f"round{r}_jenks_threshold": rep.threshold,
                f"round{r}_classes_without_confident": rep.no_confident,
                f"round{r}_n_finetune": rep.n_finetune,
                f"round{r}_finetune_acc": rep.finetune_acc,
                f"round{r}_analysis_s": round(rep.analysis_s, 3),
                f"round{r}_finetune_s": round(rep.finetune_s, 3),
            }
        )
    extras["n_flagged"] = int(reports[-1].flags.sum())
    extras["analysis_s"] = round(sum(rep.analysis_s for rep in reports), 3)
    extras["finetune_s"] = round(sum(rep.finetune_s for rep in reports), 3)
    return extras
