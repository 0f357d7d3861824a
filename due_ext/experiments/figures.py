"""Experiment figures like the paper's: metric vs training-set size (Fig. 3), explanation IoU/F1 vs threshold per
method (Fig. 5), metric vs lambda (Fig. 6) and Grad-CAM overlays per method on the same test cases (Fig. 4).

Each figure is written only when the results can show it (e.g. Fig. 3 needs two training-set sizes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from due_ext.experiments.table import METHOD_NAMES, group_rows, mean_std, row_metric
from due_ext.report.figures import _pyplot, _save, lesion_slice

#: (label, group, key) of the panels of the sweep figures (Fig. 3 and 6).
SWEEP_PANELS = (("accuracy", "prediction", "accuracy"), ("ROC-AUC", "prediction", "roc_auc"),
                ("explanation IoU", "explanation", "iou"), ("explanation F1", "explanation", "f1"))


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    present = {r["method"] for r in rows}
    return [m for m in METHOD_NAMES if m in present] + sorted(present - set(METHOD_NAMES))


def plot_sweep(rows: list[dict[str, Any]], axis: str, path: str | Path, log_x: bool = False) -> Path | None:
    """Mean +- std over seeds of each panel metric against ``axis`` (``train_size`` or ``lam``), one line per
    method; ``None`` when fewer than two values of ``axis`` were run."""
    values = sorted({r[axis] for r in rows if r[axis] is not None})
    if len(values) < 2:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(SWEEP_PANELS), figsize=(4 * len(SWEEP_PANELS), 3.2))
    groups = group_rows(rows)
    for ax, (label, section, key) in zip(axes, SWEEP_PANELS, strict=True):
        for method in _methods(rows):
            xs, means, stds = [], [], []
            for x in values:
                runs = [r for (m, _, _), g in groups.items() if m == method for r in g if r[axis] == x]
                if runs:
                    mean, std = mean_std([row_metric(r, section, key) for r in runs])
                    xs.append(x)
                    means.append(mean)
                    stds.append(std)
            if len(xs) == 1 and axis == "lam":
                # a method run at one lambda only (the baseline) is a reference line, as in the paper's Fig. 6
                ax.axhline(means[0], color="red", linestyle="--", linewidth=1, label=METHOD_NAMES.get(method, method))
            elif xs:
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=METHOD_NAMES.get(method, method))
        ax.set_xlabel("training samples" if axis == "train_size" else "λ")
        ax.set_title(label, fontsize=9)
        # prediction metrics on the 0-1 scale; explanation scores of small nodules are far below 1, so their
        # panels zoom to the data (from 0) to stay readable
        ax.set_ylim(0, 1.02) if section == "prediction" else ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def plot_threshold_curves(rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Explanation IoU and F1 vs the binarisation threshold, mean +- std over seeds, one line per method."""
    rows = [r for r in rows if r["metrics"].get("explanation_sweep")]
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric in zip(axes, ("iou", "f1"), strict=True):
        for method in _methods(rows):
            runs = [r["metrics"]["explanation_sweep"] for r in rows if r["method"] == method]
            thresholds = sorted(runs[0], key=float)
            curve = np.asarray([[run[t][metric] for t in thresholds] for run in runs], dtype=np.float64)
            mean = np.nanmean(curve, axis=0)
            x = [float(t) for t in thresholds]
            line, = ax.plot(x, mean, marker="o", markersize=3, label=METHOD_NAMES.get(method, method))
            if len(runs) > 1:
                std = np.nanstd(curve, axis=0, ddof=1)
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.12)
        ax.set_xlabel("Grad-CAM threshold")
        ax.set_ylabel("IoU" if metric == "iou" else "F1")
        ax.set_ylim(bottom=0)  # zoomed to the data: small nodules give scores far below 1
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def _first_run(out: Path, rows: list[dict[str, Any]], method: str, section: str) -> dict[str, np.ndarray] | None:
    """The recorded evaluation of ``method``'s lowest seed (first size and lambda), or None."""
    from due_ext.report.summary import EVALUATION_FILE, load_evaluation

    for row in sorted((r for r in rows if r["method"] == method),
                      key=lambda r: (r["seed"], r["train_size"] or 0, r["lam"] or 0)):
        run_dir = out / "cells" / row["cell"] / "run" / section
        if (run_dir / EVALUATION_FILE).is_file():
            arrays = load_evaluation(run_dir)
            if "fig/cam" in arrays:
                return arrays
    return None


def plot_gradcam_grid(out: str | Path, rows: list[dict[str, Any]], path: str | Path, section: str = "test",
                      n_cases: int = 4) -> Path | None:
    """Rows = test cases, columns = the mask then each method's Grad-CAM on the slice where the lesion is
    largest. The test loader does not shuffle, so every run recorded the same first positives."""
    out = Path(out)
    methods = [m for m in _methods(rows) if _first_run(out, rows, m, section) is not None]
    if not methods:
        return None
    runs = {m: _first_run(out, rows, m, section) for m in methods}
    reference = runs[methods[0]]
    n = min(n_cases, *(len(r["fig/cam"]) for r in runs.values()))
    plt = _pyplot()
    fig, axes = plt.subplots(n, len(methods) + 1, figsize=(1.7 * (len(methods) + 1), 1.8 * n), squeeze=False)
    for i in range(n):
        mask = reference["fig/mask"][i]
        z = lesion_slice(mask)
        # NIfTI (X, Y): transpose so X runs left-right, as the report's overlay figure does
        image = reference["fig/image"][i][..., z].T
        axes[i, 0].imshow(image, cmap="gray")
        axes[i, 0].contour(mask[..., z].T, levels=[0.5], colors="red", linewidths=1)
        axes[i, 0].set_title("mask" if i == 0 else "", fontsize=8)
        for j, method in enumerate(methods, start=1):
            cam = runs[method]["fig/cam"][i][..., z].T
            axes[i, j].imshow(image, cmap="gray")
            axes[i, j].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            axes[i, j].contour(mask[..., z].T, levels=[0.5], colors="white", linewidths=0.5)
            if i == 0:
                axes[i, j].set_title(METHOD_NAMES.get(method, method), fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    result = _save(fig, Path(path))
    plt.close(fig)
    return result


def section_iou_table(rows: list[dict[str, Any]], section: str = "real_tumours") -> str | None:
    """Markdown: explanation IoU (threshold 0.5) per method on an extra section, mean +- std over seeds."""
    per_method: dict[str, list[float]] = {}
    for row in rows:
        metrics = row.get("extra_sections", {}).get(section)
        if metrics and "explanation" in metrics and "iou" in metrics["explanation"]:
            per_method.setdefault(row["method"], []).append(float(metrics["explanation"]["iou"]["mean"]))
    if not per_method:
        return None
    lines = [f"| Method | runs | IoU on {section} (×100) | per run |", "|---|---|---|---|"]
    for method in _methods([{"method": m} for m in per_method]):
        values = per_method[method]
        mean, std = mean_std(values)
        shown = "n/a" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"
        lines.append(f"| {METHOD_NAMES.get(method, method)} | {len(values)} | {shown} | "
                     + ", ".join(f"{100 * v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def write_figures(out: str | Path, figures_dir: str | Path | None = None) -> list[Path]:
    """Write every figure the results in ``out`` support into ``figures_dir`` (default ``out/figures``)."""
    from due_ext.experiments.runner import read_rows

    out = Path(out)
    rows = read_rows(out)
    target = Path(figures_dir) if figures_dir is not None else out / "figures"
    written = [plot_sweep(rows, "train_size", target / "fig3_sample_size.png"),
               plot_gradcam_grid(out, rows, target / "fig4_gradcam.png"),
               plot_threshold_curves(rows, target / "fig5_threshold.png"),
               plot_sweep(rows, "lam", target / "fig6_lambda.png", log_x=True)]
    if any(r.get("extra_sections", {}).get("real_tumours") for r in rows):
        written.append(plot_gradcam_grid(out, rows, target / "real_tumours_gradcam.png", section="real_tumours",
                                         n_cases=2))
    return [p for p in written if p is not None]
