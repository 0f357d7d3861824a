"""Turn a recorded evaluation (``evaluation.npz``) into ``metrics.json``, ``metrics.csv`` and figures."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from due_ext.data.atomic import atomic_destination
from due_ext.data.datalist import write_json_atomic
from due_ext.metrics.prediction import classification_scores

EVALUATION_FILE = "evaluation.npz"
REPORT_THRESHOLD = 0.5
SCORE_NAMES = ("iou", "precision", "recall", "f1")
#: Key prefix of the floors' per-positive scores in ``evaluation.npz``: ``floor/<floor>/<metric>``.
FLOOR_PREFIX = "floor/"


def load_evaluation(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The arrays an :class:`~due_ext.report.recorder.EvaluationRecorder` wrote to ``run_dir``."""
    path = Path(run_dir) / EVALUATION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no recorded evaluation; run the evaluate config first")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _mean_std(values: np.ndarray) -> dict[str, float]:
    """Mean, population std and count of the finite values (a localisation metric is nan for an empty mask)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite)), "n": int(finite.size)}


def summarize_evaluation(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Metrics of one evaluation: ``prediction`` (all items), ``explanation`` (positives with a mask, at
    threshold 0.5, mean/std/n, plus the soft, localisation and faithfulness scores), ``explanation_sweep`` (mean
    IoU/precision/recall/F1 per threshold) and ``floors`` (the same explanation and localisation scores of the
    Gaussian-blob and initial-network floors, and the blob's ``lesion_voxels``)."""
    labels, probs = arrays["label"].reshape(-1), arrays["prob"]
    summary: dict[str, Any] = {"n_items": int(labels.size), "n_positives": int((labels == 1).sum()),
                               "prediction": classification_scores(labels, probs[:, 1])}
    positives = {k[len("pos/"):]: v for k, v in arrays.items() if k.startswith("pos/")}
    summary["n_explained"] = int(next(iter(positives.values())).size) if positives else 0
    if not positives:
        summary["explanation"] = {}
        return summary
    at = f"@{REPORT_THRESHOLD:.1f}"
    summary["explanation"] = {name: _mean_std(positives[name + at]) for name in SCORE_NAMES}
    summary["explanation"]["annotation_coverage"] = _mean_std(positives["recall" + at])
    for name in sorted(positives):
        if "@" not in name:
            summary["explanation"][name] = _mean_std(positives[name])
    summary["explanation_sweep"] = {
        f"{t:.1f}": {name: float(np.mean(positives[f"{name}@{t:.1f}"])) for name in SCORE_NAMES}
        for t in arrays["thresholds"]}
    floors: dict[str, dict[str, Any]] = {}
    for key, values in arrays.items():
        if key.startswith(FLOOR_PREFIX):
            floor, name = key[len(FLOOR_PREFIX):].split("/", 1)
            floors.setdefault(floor, {})[name] = (float(values[0]) if name == "lesion_voxels"
                                                  else _mean_std(values))
    summary["floors"] = {floor: dict(sorted(scores.items())) for floor, scores in sorted(floors.items())}
    return summary


def _csv_rows(summary: dict[str, Any]) -> list[tuple[str, str, float]]:
    rows = [("prediction", k, v) for k, v in summary["prediction"].items()]
    for name, stats in summary.get("explanation", {}).items():
        rows += [("explanation", f"{name}_{s}", stats[s]) for s in ("mean", "std")]
    for t, scores in summary.get("explanation_sweep", {}).items():
        rows += [("explanation_sweep", f"{name}@{t}", v) for name, v in scores.items()]
    for floor, scores in summary.get("floors", {}).items():
        for name, stats in scores.items():
            rows += ([(f"floor_{floor}", name, stats)] if not isinstance(stats, dict)
                     else [(f"floor_{floor}", f"{name}_{s}", stats[s]) for s in ("mean", "std")])
    return rows


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """(Re)write ``metrics.json``, ``metrics.csv`` and the PNG figures of ``run_dir``; returns the summary."""
    from due_ext.report.figures import plot_gradcam_overlays, plot_threshold_sweep

    run_dir = Path(run_dir)
    arrays = load_evaluation(run_dir)
    summary = summarize_evaluation(arrays)
    write_json_atomic(run_dir / "metrics.json", summary)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["group", "metric", "value"])
    writer.writerows(_csv_rows(summary))
    with atomic_destination(run_dir / "metrics.csv") as tmp:
        Path(tmp).write_text(buffer.getvalue())
    if "explanation_sweep" in summary:
        plot_threshold_sweep(summary["explanation_sweep"], run_dir / "explanation_vs_threshold.png")
    if "fig/cam" in arrays:
        plot_gradcam_overlays(arrays["fig/image"], arrays["fig/mask"], arrays["fig/cam"],
                              run_dir / "gradcam_overlays.png")
    return summary
