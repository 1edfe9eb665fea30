"""n, mean, std, the t interval, and paired differences on shared backdoored models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from benchmark.collect import load_records
from benchmark.stats import paired_comparison, paired_differences, summarize
from tests.benchmark.records import write_record


def test_summary_is_the_t_interval_of_the_mean() -> None:
    x = [91.0, 92.5, 93.0, 90.5]
    s = summarize(x)
    half = stats.t.ppf(0.975, 3) * np.std(x, ddof=1) / 2
    assert (s.n, s.mean, s.std) == (4, pytest.approx(91.75), pytest.approx(np.std(x, ddof=1)))
    assert (s.ci_low, s.ci_high) == (pytest.approx(91.75 - half), pytest.approx(91.75 + half))
    # By hand: t(0.975, 3) = 3.1824, std 1.190, so the half width is 1.894.
    assert s.ci_high - s.mean == pytest.approx(1.894, abs=1e-3)
    assert s.text() == "91.8 ± 1.2 [89.9, 93.6] n=4"


def test_summary_edge_cases() -> None:
    one = summarize([50.0])
    assert one.n == 1 and one.mean == 50.0 and math.isnan(one.ci_low)
    assert one.text() == "50.0 n=1"
    assert summarize([math.nan, None]).text() == "-"
    same = summarize([95.0, 95.0])
    assert same.std == 0.0 and same.ci_low == same.ci_high == 95.0


def test_paired_differences_pair_defenses_on_the_same_backdoored_model(tmp_path: Path) -> None:
    # Three backdoored models (seeds); ulrl beats NONE by 10 +- 1 points of ASR on each, while
    # the models themselves differ by 30 points (which an unpaired comparison would carry).
    for seed, (base, gap) in enumerate([(0.3, 0.10), (0.6, 0.11), (0.9, 0.09)]):
        key = f"m{seed}"
        write_record(tmp_path / f"n{seed}", ("defense=NONE",), seed, asr=base, model_key=key)
        write_record(tmp_path / f"u{seed}", ("defense=ulrl",), seed, asr=base - gap, model_key=key)
    # A model only NONE defended is left out of the pairs.
    write_record(tmp_path / "n9", ("defense=NONE",), 9, asr=0.5, model_key="m9")
    frame = load_records([tmp_path])
    diff = paired_differences(frame, "ulrl", "NONE", "asr")
    assert sorted(diff.index) == ["m0", "m1", "m2"]
    assert diff.to_numpy() == pytest.approx([-0.10, -0.11, -0.09])
    table = paired_comparison(frame)
    asr = table[table["metric"] == "asr"].iloc[0]
    assert (asr["defense_a"], asr["defense_b"], asr["n_pairs"]) == ("NONE", "ulrl", 3)
    assert asr["mean_diff"] == pytest.approx(10.0)
    assert asr["ci_low"] > 7 and asr["ci_high"] < 13  # tight: the model variation cancels
    ca = table[table["metric"] == "clean_acc"].iloc[0]
    assert ca["mean_diff"] == pytest.approx(0.0)
