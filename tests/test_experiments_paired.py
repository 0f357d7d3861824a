"""Paired differences against a reference method (due_ext/experiments/paired.py), on hand-computed rows."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from due_ext.experiments.paired import bootstrap_interval, paired_across, paired_differences, paired_markdown


def _row(method: str, seed: int, roc: float, iou: float, train_size: int = 20, lam: float = 0.1) -> dict:
    return {"method": method, "seed": seed, "train_size": train_size, "lam": lam,
            "metrics": {"prediction": {"roc_auc": roc},
                        "explanation": {"iou": {"mean": iou}, "mask_auroc": {"mean": float("nan")}}}}


def test_bootstrap_interval_of_constant_values_is_that_value():
    assert bootstrap_interval(np.full(5, 0.25)) == pytest.approx((0.25, 0.25))


def test_bootstrap_interval_of_two_values_spans_them():
    # resampled means of [0, 1] are 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4: the 2.5/97.5 % quantiles are 0, 1
    assert bootstrap_interval(np.array([0.0, 1.0])) == pytest.approx((0.0, 1.0))


def test_bootstrap_interval_is_inside_the_range_and_around_the_mean():
    values = np.array([0.1, 0.3, -0.2, 0.4, 0.0])
    low, high = bootstrap_interval(values)
    assert values.min() <= low < values.mean() < high <= values.max()


@pytest.mark.parametrize("values, confidence", [(np.array([]), 0.95), (np.ones((2, 2)), 0.95),
                                                (np.ones(3), 1.0)])
def test_bootstrap_interval_rejects_bad_input(values, confidence):
    with pytest.raises(ValueError):
        bootstrap_interval(values, confidence=confidence)


def test_differences_pair_rows_by_seed_and_skip_unpaired_and_nan():
    rows = [_row("baseline_plus", s, 0.8, 0.2) for s in range(3)]
    rows += [_row("due", 0, 0.9, 0.25), _row("due", 1, 0.7, 0.30), _row("due", 2, 0.8, float("nan")),
             _row("due", 7, 0.1, 0.9)]  # seed 7 has no reference row: left out
    (due,) = paired_differences(rows)
    assert due["ROC-AUC"]["n"] == 3 and due["ROC-AUC"]["mean"] == pytest.approx((0.1 - 0.1 + 0.0) / 3)
    assert due["ROC-AUC"]["above"] == 1
    assert due["IoU"]["n"] == 2 and due["IoU"]["mean"] == pytest.approx((0.05 + 0.10) / 2)
    assert due["IoU"]["above"] == 2
    assert (due["IoU"]["low"], due["IoU"]["high"]) == pytest.approx((0.05, 0.10))
    assert due["Mask AUROC"]["n"] == 0 and np.isnan(due["Mask AUROC"]["mean"])


def test_differences_pair_by_training_size_and_keep_lambda_groups_apart():
    rows = [_row("baseline", 0, 0.5, 0.1, train_size=n) for n in (20, 50)]
    rows += [_row("due", 0, 0.6, 0.1, train_size=20, lam=0.1), _row("due", 0, 0.9, 0.1, train_size=20, lam=1.0),
             _row("due", 0, 0.8, 0.1, train_size=50, lam=0.1)]
    entries = {(e["train_size"], e["lam"]): e for e in paired_differences(rows, reference="baseline")}
    assert entries[(20, 0.1)]["ROC-AUC"]["mean"] == pytest.approx(0.1)
    assert entries[(20, 1.0)]["ROC-AUC"]["mean"] == pytest.approx(0.4)
    assert entries[(50, 0.1)]["ROC-AUC"]["mean"] == pytest.approx(0.3)


def test_missing_reference_is_an_error_naming_it():
    with pytest.raises(ValueError, match="baseline_plus"):
        paired_differences([_row("due", 0, 0.9, 0.2)])


def test_markdown_cell_reads_mean_interval_and_seeds_above():
    rows = [_row("baseline_plus", s, 0.8, 0.2) for s in range(2)] + [_row("due", s, 0.8, 0.3) for s in range(2)]
    line = next(x for x in paired_markdown(rows).splitlines() if x.startswith("| DUE"))
    assert "+10.00 [+10.00, +10.00] (2/2)" in line and "+0.00 [+0.00, +0.00] (0/2)" in line


def test_cli_prints_the_table_and_fails_without_the_reference(tmp_path):
    rows = [_row("baseline_plus", 0, 0.8, 0.2), _row("sdf_fill", 0, 0.9, 0.2)]
    for row in rows:  # the runner's layout: one result.json per cell
        cell = tmp_path / "cells" / f"{row['method']}-s{row['seed']}"
        cell.mkdir(parents=True)
        (cell / "result.json").write_text(json.dumps(row))
    run = [sys.executable, "-m", "due_ext", "experiment", "paired", str(tmp_path)]
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| SDF fill (w = 1) | +10.00 [+10.00, +10.00] (1/1)" in done.stdout
    failed = subprocess.run(run + ["--reference", "rrr"], capture_output=True, text=True)
    assert failed.returncode == 2 and "'rrr'" in failed.stderr


def test_across_experiments_pairs_each_method_with_itself():
    eq2 = [_row("due", s, 0.9, 0.3 + 0.1 * s) for s in range(2)] + [_row("sdf_fill", 0, 0.9, 0.5)]
    l1 = [_row("due", s, 0.9, 0.3) for s in range(2)] + [_row("sdf_fill", 0, 0.9, 0.2), _row("baseline_plus", 0, 0, 0)]
    entries = {e["method"]: e for e in paired_across(eq2, l1)}
    assert set(entries) == {"due", "sdf_fill"}
    assert entries["due"]["IoU"]["mean"] == pytest.approx(0.05) and entries["due"]["IoU"]["above"] == 1
    assert entries["sdf_fill"]["IoU"]["mean"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="'sdf_fill'"):
        paired_across(eq2, l1[:2])
    line = next(x for x in paired_markdown(eq2, reference_rows=l1, reference_name="L1").splitlines()
                if x.startswith("| DUE"))
    assert "+5.00 [+0.00, +10.00] (1/2)" in line
