"""Statistics over seeds: n, mean, std, a 95% confidence interval, and paired differences.

Seeds are replicates of one setting (:mod:`benchmark.collect` keeps one row per setting and
seed). The interval is Student's t for the mean, ``mean ± t(0.975, n-1) · std / sqrt(n)`` with
the sample std (ddof 1); it needs two values at least. A paired comparison of two defenses uses
the runs that defended the *same* backdoored model (the same cache key: same data, attack,
recipe and seed), so the backdoored model's own variation cancels out of the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    """n, mean, sample std and the t interval of the mean (NaN where undefined)."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    def text(self, digits: int = 1) -> str:
        """``"91.3 ± 0.4 [90.3, 92.3] n=3"``; ``"91.3 n=1"``; ``"-"`` with no value."""
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{self.mean:.{digits}f} n=1"
        return (
            f"{self.mean:.{digits}f} ± {self.std:.{digits}f} "
            f"[{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}] n={self.n}"
        )


def summarize(values: pd.Series | np.ndarray | list[float], level: float = LEVEL) -> Summary:
    """The :class:`Summary` of the non-missing ``values``."""
    x = pd.Series(values, dtype=float).dropna().to_numpy()
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    from scipy import stats  # here: its import costs ~1 s per CLI call

    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired_differences(
    frame: pd.DataFrame, a: str, b: str, column: str, pair_on: str = "model_key"
) -> pd.Series:
    """``column`` of defense label ``a`` minus that of ``b`` on each backdoored model both
    defended (``pair_on``: the cache key), complete runs only; indexed by ``pair_on``."""
    done = frame[(frame["status"] == "complete") & frame[pair_on].notna()]

    def side(name: str) -> pd.Series:
        rows = done[done["column_label"] == name]
        return rows.groupby(pair_on)[column].mean().astype(float)

    left, right = side(a), side(b)
    common = left.index.intersection(right.index)
    return (left[common] - right[common]).dropna()


def paired_comparison(
    frame: pd.DataFrame, columns: tuple[str, ...] = ("clean_acc", "asr"), scale: float = 100.0
) -> pd.DataFrame:
    """Every pair of defenses in each row of the table that share backdoored models: the mean
    paired difference (first minus second, in percent) with its std and 95% interval, per
    metric. Rows: ``dataset, model, attack, defense_a, defense_b, metric, n_pairs, mean_diff,
    std, ci_low, ci_high``."""
    out = []
    keys = ["dataset", "model", "row_label"]
    for key, group in frame.groupby(keys, dropna=False):
        names = sorted(group["column_label"].dropna().unique(), key=_baseline_first)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                for column in columns:
                    diff = paired_differences(group, a, b, column) * scale
                    if diff.empty:
                        continue
                    s = summarize(diff)
                    out.append(
                        {
                            **dict(zip(["dataset", "model", "attack"], key, strict=True)),
                            "defense_a": a,
                            "defense_b": b,
                            "metric": column,
                            "n_pairs": s.n,
                            "mean_diff": s.mean,
                            "std": s.std,
                            "ci_low": s.ci_low,
                            "ci_high": s.ci_high,
                        }
                    )
    return pd.DataFrame(
        out,
        columns=[
            "dataset", "model", "attack", "defense_a", "defense_b", "metric", "n_pairs",
            "mean_diff", "std", "ci_low", "ci_high",
        ],
    )  # fmt: skip


def _baseline_first(name: str) -> tuple[bool, str]:
    return (not name.startswith("undefended"), name)
