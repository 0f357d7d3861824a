"""Aggregate results rows into a Table-1-style markdown table: mean +- std over seeds, in percent as the paper.

Columns: ROC-AUC and PR-AUC of the test predictions; explanation IoU, precision, recall and F1 of the Grad-CAM
binarised at 0.5 (mean over the test positives of one run, then mean and sample std over the seeds). When the rows
carry them (runs since the localisation metrics were added), also the resolution-robust localisation metrics
(:mod:`due_ext.metrics.localisation`: pointing game, energy pointing game, mask AUROC, IoU at the best threshold)
and one row per floor (:mod:`due_ext.metrics.floors`), its value per seed taken from any row of that seed (the floor
does not depend on the method), then mean and sample std over the seeds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

#: (column, group in metrics.json, key) of the table, in the paper's order.
COLUMNS = (("ROC-AUC", "prediction", "roc_auc"), ("PR-AUC", "prediction", "pr_auc"),
           ("IoU", "explanation", "iou"), ("Precision", "explanation", "precision"),
           ("Recall", "explanation", "recall"), ("F1", "explanation", "f1"))
#: Localisation columns, shown when any row has them.
LOCALISATION_COLUMNS = (("Pointing", "explanation", "pointing_game"),
                        ("Energy pointing", "explanation", "energy_pointing_game"),
                        ("Mask AUROC", "explanation", "mask_auroc"),
                        ("IoU best t", "explanation", "iou_best_threshold"))
#: The floors' display names, in table order; their rows fill the columns the floor records (IoU, F1, localisation).
FLOOR_NAMES = {"gaussian_blob": "floor: centred Gaussian blob", "initial_cam": "floor: Grad-CAM at initialisation"}
#: Display names as the paper writes them.
METHOD_NAMES = {"baseline": "Baseline", "baseline_plus": "Baseline+", "sdf_fill": "SDF fill (w = 1)",
                "diffusion_fill": "Diffusion fill (w = 1)", "due": "DUE",
                "due_diffusion_variance": "DUE, diffusion-variance w", "gradia": "GRADIA",
                "haics": "HAICS", "res_g": "RES-G", "rrr": "RRR", "exbl": "eXBL"}


def row_metric(row: dict[str, Any], group: str, key: str) -> float:
    """One number of a results row (``nan`` when the run has none, e.g. no explained positive)."""
    value = row["metrics"].get(group, {}).get(key, float("nan"))
    if isinstance(value, dict):  # explanation scores are {mean, std, n} over the test positives
        value = value.get("mean", float("nan"))
    return float("nan") if value is None else float(value)


def floor_metric(row: dict[str, Any], floor: str, key: str) -> float:
    """The mean of ``key`` of the floor ``floor`` in a results row (``nan`` when the row has none)."""
    value = row["metrics"].get("floors", {}).get(floor, {}).get(key, {})
    value = value.get("mean", float("nan")) if isinstance(value, dict) else value
    return float("nan") if value is None else float(value)


def table_columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, str, str], ...]:
    """:data:`COLUMNS`, plus :data:`LOCALISATION_COLUMNS` when any row has a localisation score."""
    has = any(key in r["metrics"].get(group, {}) for r in rows for _, group, key in LOCALISATION_COLUMNS)
    return COLUMNS + LOCALISATION_COLUMNS if has else COLUMNS


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) ignoring nan; (nan, nan) if all nan."""
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if finite.size == 0:
        return float("nan"), float("nan")
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0


def group_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, Any, Any], list[dict[str, Any]]]:
    """Rows by (method, train_size, lam), seeds together."""
    groups: dict[tuple[str, Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["train_size"], row["lam"])].append(row)
    return groups


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, train_size, lam): seeds, and mean/std of every table column."""
    order = {m: i for i, m in enumerate(METHOD_NAMES)}
    out = []
    for (method, size, lam), group in group_rows(rows).items():
        entry: dict[str, Any] = {"method": method, "train_size": size, "lam": lam,
                                 "seeds": sorted(r["seed"] for r in group)}
        for column, section, key in table_columns(rows):
            entry[column] = mean_std([row_metric(r, section, key) for r in group])
        out.append(entry)
    return sorted(out, key=lambda e: (order.get(e["method"], 99), e["train_size"] or 0, e["lam"] or 0))


def summarize_floors(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per floor some row recorded: its seeds and the mean/std over seeds of each column it has
    (one value per seed, from the first row of that seed; ``nan`` for the prediction columns)."""
    out = []
    for floor in FLOOR_NAMES:
        per_seed: dict[int, dict[str, Any]] = {}
        for row in rows:
            if floor in row["metrics"].get("floors", {}):
                per_seed.setdefault(row["seed"], row)
        if not per_seed:
            continue
        entry: dict[str, Any] = {"floor": floor, "seeds": sorted(per_seed)}
        for column, _, key in table_columns(rows):
            entry[column] = mean_std([floor_metric(r, floor, key) for r in per_seed.values()])
        out.append(entry)
    return out


def _cell(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown_table(rows: list[dict[str, Any]], planned: dict[tuple[str, Any, Any], int] | None = None) -> str:
    """The markdown table of ``rows``; ``planned`` (seeds planned per group) marks groups with missing seeds
    and lists groups with no finished run at all."""
    entries = summarize(rows)
    columns = table_columns(rows)
    sizes = {e["train_size"] for e in entries} | {k[1] for k in (planned or {})}
    lams = {e["lam"] for e in entries} | {k[2] for k in (planned or {}) if k[2] is not None}
    lead = ["Method"] + (["n train"] if len(sizes) > 1 else []) + (["λ"] if len(lams) > 1 else []) + ["seeds"]
    lines = ["| " + " | ".join(lead + [c[0] for c in columns]) + " |",
             "|" + "---|" * (len(lead) + len(columns))]
    for e in entries:
        seeds = str(len(e["seeds"]))
        want = (planned or {}).get((e["method"], e["train_size"], e["lam"]))
        if want is not None and want > len(e["seeds"]):
            seeds += f" of {want} (incomplete)"
        cells = [METHOD_NAMES.get(e["method"], e["method"])]
        cells += [str(e["train_size"])] if len(sizes) > 1 else []
        cells += [f"{e['lam']:g}" if e["lam"] is not None else "default"] if len(lams) > 1 else []
        cells += [seeds] + [_cell(*e[c[0]]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    for e in summarize_floors(rows):
        cells = [FLOOR_NAMES[e["floor"]]] + [""] * (len(lead) - 2) + [str(len(e["seeds"]))]
        lines.append("| " + " | ".join(cells + [_cell(*e[c[0]]) for c in columns]) + " |")
    done = {(e["method"], e["train_size"], e["lam"]) for e in entries}
    for method, size, lam in sorted((k for k in (planned or {}) if k not in done and not _lam_default(k, done)),
                                    key=str):
        lines.append(f"| {METHOD_NAMES.get(method, method)} (not run yet: n={size}, λ={lam}) |"
                     + " |" * (len(lead) + len(columns) - 1))
    return "\n".join(lines)


def _lam_default(key: tuple[str, Any, Any], done: set[tuple[str, Any, Any]]) -> bool:
    """A planned group with the bundle's default λ (None) is matched by a finished row with any λ."""
    return key[2] is None and any(d[:2] == key[:2] for d in done)


def planned_groups(out: str | Path) -> dict[tuple[str, Any, Any], int] | None:
    """Seeds planned per (method, train_size, lam) from ``out/experiment.json`` (None if absent)."""
    import json

    from due_ext.experiments.runner import EXPERIMENT_FILE

    path = Path(out) / EXPERIMENT_FILE
    if not path.is_file():
        return None
    grids = json.loads(path.read_text())["experiment"]["grid"]
    planned: dict[tuple[str, Any, Any], set[int]] = defaultdict(set)
    for grid in grids if isinstance(grids, list) else [grids]:
        for m in grid["method"]:
            for n in grid["train_size"]:
                for lam in grid["lam"]:
                    planned[(m, n, lam)] |= set(grid["seed"])
    return {key: len(seeds) for key, seeds in planned.items()}


def section_rows(rows: list[dict[str, Any]], section: str) -> list[dict[str, Any]]:
    """``rows`` with ``metrics`` = the evaluation of ``section``: the test split for ``"test"``, else the row's
    ``extra_sections`` entry (rows without it, or whose evaluation failed, are left out)."""
    if section == "test":
        return rows
    return [{**row, "metrics": row["extra_sections"][section]} for row in rows
            if "error" not in row.get("extra_sections", {}).get(section, {"error": "absent"})]


def experiment_table(out: str | Path, section: str = "test") -> str:
    """The markdown table of the experiment folder ``out`` (missing seeds and cells marked), on the test split
    or on one of the experiment's ``extra_sections``."""
    from due_ext.experiments.runner import read_rows

    rows = section_rows(read_rows(out), section)
    planned = planned_groups(out)
    if planned is not None:
        # the bundle-default λ (None in the grid) is recorded in each row as the value it resolved to
        resolved = {(r["method"], r["train_size"]): r["lam"] for r in rows}
        planned = {(m, n, resolved.get((m, n), lam) if lam is None else lam): k for (m, n, lam), k in planned.items()}
    if not rows:
        return f"{out}: no finished cell yet" + ("" if section == "test" else f" with section {section!r}")
    return markdown_table(rows, planned)
