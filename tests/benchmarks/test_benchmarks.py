"""The benchmark harness: the results file's shape and arithmetic, and that the training-step baseline
computes the same loss as sgmodel (otherwise its speed ratio would compare different work).

Running the benchmarks themselves takes minutes (`python benchmarks/run_all.py --quick`), so these
tests check the recorded results.json and the harness's own functions instead.
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.common import LOWER_IS_BETTER, REQUIRED, RESULTS, fmt, result, table


def test_ratio_is_value_over_limit_and_inverted_for_bytes():
    speed = result("loader", 80.0, 100.0, "images/s")
    assert speed["ratio"] == pytest.approx(0.8)
    storage = result("storage", 1_000.0, 50_000.0, "bytes")
    assert storage["ratio"] == pytest.approx(50.0)  # baseline bytes / our bytes: > 1 is better
    assert {"value", "limit_or_baseline", "ratio", "unit"} <= set(speed)


def test_table_marks_missed_goals():
    rows = {"loader": result("loader", 50.0, 100.0, "images/s"), "storage": result("storage", 1.0, 30.0, "bytes")}
    text = table(rows, {"loader": 0.8, "storage": 20.0})
    loader_line = next(line for line in text.splitlines() if line.startswith("| loader"))
    storage_line = next(line for line in text.splitlines() if line.startswith("| storage"))
    assert "**no**" in loader_line and "0.50x" in loader_line
    assert "yes" in storage_line and "30.00x" in storage_line


@pytest.mark.skipif(not RESULTS.is_file(), reason="benchmarks/results.json not generated yet")
def test_recorded_results_have_every_benchmark_and_consistent_ratios():
    results = json.loads(RESULTS.read_text())
    assert set(REQUIRED) <= set(results)
    for name in REQUIRED:
        row = results[name]
        value, limit, ratio = row["value"], row["limit_or_baseline"], row["ratio"]
        assert value > 0 and limit > 0 and isinstance(row["unit"], str) and row["unit"]
        expected = limit / value if name in LOWER_IS_BETTER else value / limit
        assert math.isclose(ratio, expected, rel_tol=1e-3), name


def test_baseline_computes_sgmodels_loss():
    pytest.importorskip("transformers")
    from benchmarks.bench_train_step import check_baseline

    assert math.isfinite(check_baseline())  # raises if the two losses differ


def test_table_numbers_keep_their_magnitude():
    assert fmt(11571.0) == "11.6k" and fmt(9414.0) == "9414" and fmt(123456.0) == "123k"
    assert fmt(5.13e9) == "5.13G" and fmt(49.6e6) == "49.6M" and fmt(718.5) == "718" and fmt(0.398) == "0.398"
