"""Paired differences against a reference method, seed by seed, with a percentile-bootstrap interval.

Every cell of a grid with the same ``(seed, train_size)`` trains on the same subset and is tested on the same
crops, so ``method - reference`` per seed removes what the seed alone moves (the subset, the initialisation). Over
the seeds that both finished: the mean difference, a 95 % percentile-bootstrap interval of that mean (the seeds
resampled with replacement) and how many seeds the method was above. Over a handful of seeds a percentile
bootstrap is narrow (it cannot exceed the range of the differences), so read an interval that excludes 0 as
"consistent over these seeds", not as a test over all possible seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from due_ext.experiments.table import METHOD_NAMES, group_rows, row_metric, section_rows

#: (column, group in metrics.json, key) compared: the prediction and the localisation that issue 15 asks about.
PAIRED_COLUMNS = (("ROC-AUC", "prediction", "roc_auc"), ("IoU", "explanation", "iou"),
                  ("Energy pointing", "explanation", "energy_pointing_game"),
                  ("Mask AUROC", "explanation", "mask_auroc"))


def bootstrap_interval(values: np.ndarray, n_boot: int = 10000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampled with replacement ``n_boot`` times)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"need a non-empty 1D array of values, got shape {values.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_differences(rows: list[dict[str, Any]], reference: str = "baseline_plus",
                       columns: tuple[tuple[str, str, str], ...] = PAIRED_COLUMNS, n_boot: int = 10000,
                       confidence: float = 0.95) -> list[dict[str, Any]]:
    """One entry per ``(method, train_size, lam)`` other than ``reference``: for every column, the seeds both
    have a finite value for, the mean of ``method - reference`` over them, its bootstrap interval and the number
    of seeds above. The reference row of a seed is the one with the same ``train_size`` (its λ is its own)."""
    reference_rows = {(r["seed"], r["train_size"]): r for r in rows if r["method"] == reference}
    if not reference_rows:
        raise ValueError(f"no finished row of the reference method {reference!r}")
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    out = []
    for (method, size, lam), group in group_rows([r for r in rows if r["method"] != reference]).items():
        entry: dict[str, Any] = {"method": method, "train_size": size, "lam": lam}
        for column, section, key in columns:
            pairs = [(row_metric(r, section, key), row_metric(reference_rows[(r["seed"], size)], section, key))
                     for r in group if (r["seed"], size) in reference_rows]
            diffs = np.asarray([a - b for a, b in pairs if not (math.isnan(a) or math.isnan(b))])
            if diffs.size == 0:
                entry[column] = {"n": 0, "mean": float("nan"), "low": float("nan"), "high": float("nan"), "above": 0}
                continue
            low, high = bootstrap_interval(diffs, n_boot=n_boot, confidence=confidence)
            entry[column] = {"n": int(diffs.size), "mean": float(diffs.mean()), "low": low, "high": high,
                             "above": int((diffs > 0).sum())}
        out.append(entry)
    return sorted(out, key=lambda e: (order.get(e["method"], 99), str(e["method"]), e["train_size"] or 0,
                                      e["lam"] or 0))


def paired_across(rows: list[dict[str, Any]], reference_rows: list[dict[str, Any]],
                  columns: tuple[tuple[str, str, str], ...] = PAIRED_COLUMNS, n_boot: int = 10000,
                  confidence: float = 0.95) -> list[dict[str, Any]]:
    """:func:`paired_differences` of each method of ``rows`` against the **same** method in ``reference_rows``
    (another experiment that changed one setting, e.g. the loss reading), seed by seed."""
    reference = "__reference__"
    out = []
    for method in sorted({r["method"] for r in rows}):
        theirs = [{**r, "method": reference} for r in reference_rows if r["method"] == method]
        if not theirs:
            raise ValueError(f"the reference experiment has no finished row of {method!r}")
        out += paired_differences([r for r in rows if r["method"] == method] + theirs, reference=reference,
                                  columns=columns, n_boot=n_boot, confidence=confidence)
    return out


def _difference_cell(stats: dict[str, Any]) -> str:
    if stats["n"] == 0:
        return "n/a"
    return (f"{100 * stats['mean']:+.2f} [{100 * stats['low']:+.2f}, {100 * stats['high']:+.2f}] "
            f"({stats['above']}/{stats['n']})")


def paired_markdown(rows: list[dict[str, Any]], reference: str = "baseline_plus",
                    columns: tuple[tuple[str, str, str], ...] = PAIRED_COLUMNS,
                    reference_rows: list[dict[str, Any]] | None = None, reference_name: str | None = None) -> str:
    """The markdown table of :func:`paired_differences` (or, with ``reference_rows``, of :func:`paired_across`,
    the reference then named ``reference_name``): per column ``mean [low, high] (seeds above/seeds)``, x100."""
    if reference_rows is None:
        entries = paired_differences(rows, reference=reference, columns=columns)
        name = METHOD_NAMES.get(reference, reference)
    else:
        entries = paired_across(rows, reference_rows, columns=columns)
        name = reference_name or "the same method in the reference experiment"
    sizes = {e["train_size"] for e in entries}
    lams = {e["lam"] for e in entries}
    lead = ["Method"] + (["n train"] if len(sizes) > 1 else []) + (["λ"] if len(lams) > 1 else [])
    lines = ["| " + " | ".join(lead + [f"Δ{c[0]} vs {name}" for c in columns]) + " |",
             "|" + "---|" * (len(lead) + len(columns))]
    for e in entries:
        cells = [METHOD_NAMES.get(e["method"], e["method"])]
        cells += [str(e["train_size"])] if len(sizes) > 1 else []
        cells += [f"{e['lam']:g}" if e["lam"] is not None else "default"] if len(lams) > 1 else []
        lines.append("| " + " | ".join(cells + [_difference_cell(e[c[0]]) for c in columns]) + " |")
    return "\n".join(lines)


def experiment_paired_table(out: str | Path, reference: str = "baseline_plus", section: str = "test",
                            against: str | Path | None = None) -> str:
    """:func:`paired_markdown` of the experiment folder ``out`` on the test split or an extra section: against
    the method ``reference`` of ``out``, or, with ``against`` (another experiment folder), each method against
    the same method there."""
    from due_ext.experiments.runner import read_rows

    rows = section_rows(read_rows(out), section)
    if not rows:
        return f"{out}: no finished cell yet"
    if against is None:
        return paired_markdown(rows, reference=reference)
    theirs = section_rows(read_rows(against), section)
    if not theirs:
        raise ValueError(f"{against}: no finished cell")
    return paired_markdown(rows, reference_rows=theirs, reference_name=f"same method in {Path(against).name}")
