"""Report figures like the paper's: Grad-CAM overlays on axial slices next to the annotation (Fig. 4) and
explanation IoU/F1 versus the binarisation threshold (Fig. 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from due_ext.data.atomic import atomic_destination


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_destination(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def lesion_slice(mask: np.ndarray) -> int:
    """The axial (Z) slice with the most mask voxels; the middle slice for an empty mask."""
    per_slice = mask.reshape(-1, mask.shape[-1]).sum(0)
    return int(np.argmax(per_slice)) if per_slice.any() else mask.shape[-1] // 2


def cam_overlay(image: np.ndarray, cam: np.ndarray, mask: np.ndarray | None = None,
                alpha: float = 0.45) -> np.ndarray:
    """One axial slice as an RGB picture: the image in grey (min-max scaled), the Grad-CAM blended over it with the
    jet colour map (``alpha`` its weight, CAM values in [0, 1]) and the mask's outline in white. Inputs ``(X, Y)``;
    returns ``(Y, X, 3)`` uint8, X running left-right as in :func:`plot_gradcam_overlays`."""
    from matplotlib import colormaps

    image, cam = np.asarray(image, np.float64).T, np.clip(np.asarray(cam, np.float64).T, 0.0, 1.0)
    span = image.max() - image.min()
    grey = (image - image.min()) / span if span > 0 else np.zeros_like(image)
    rgb = (1.0 - alpha) * grey[..., None] + alpha * colormaps["jet"](cam)[..., :3]
    if mask is not None:
        inside = np.asarray(mask).T > 0.5
        padded = np.pad(inside, 1, mode="edge")
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        rgb[inside & ~interior] = 1.0  # the mask voxels with a 4-neighbour outside it
    return np.round(rgb * 255.0).astype(np.uint8)


def plot_gradcam_overlays(images: np.ndarray, masks: np.ndarray, cams: np.ndarray, path: str | Path) -> Path:
    """For each positive: the image with its mask outlined, and the Grad-CAM heatmap over the image, on the
    axial slice where the lesion is largest. Inputs ``(N, X, Y, Z)``."""
    plt = _pyplot()
    n = len(images)
    fig, axes = plt.subplots(n, 2, figsize=(5.0, 2.5 * n), squeeze=False)
    for i in range(n):
        z = lesion_slice(masks[i])
        # NIfTI (X, Y) shown with X down rows: transpose so X runs left-right as in radiological viewers
        image, mask, cam = images[i][..., z].T, masks[i][..., z].T, cams[i][..., z].T
        axes[i, 0].imshow(image, cmap="gray")
        axes[i, 0].contour(mask, levels=[0.5], colors="red", linewidths=1)
        axes[i, 0].set_title(f"mask, z={z}", fontsize=8)
        axes[i, 1].imshow(image, cmap="gray")
        axes[i, 1].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axes[i, 1].contour(mask, levels=[0.5], colors="white", linewidths=0.6)
        axes[i, 1].set_title("Grad-CAM", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def plot_threshold_sweep(sweep: dict[str, dict[str, float]], path: str | Path,
                         curves: dict[str, dict[str, dict[str, float]]] | None = None) -> Path:
    """Explanation IoU and F1 against the threshold. ``sweep`` maps threshold -> {metric: value}; ``curves``
    optionally maps a method name to its own sweep (then one line per method)."""
    plt = _pyplot()
    curves = curves or {"model": sweep}
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, metric in zip(axes, ("iou", "f1"), strict=True):
        for name, values in curves.items():
            thresholds = sorted(values, key=float)
            ax.plot([float(t) for t in thresholds], [values[t][metric] for t in thresholds], marker="o", label=name)
        ax.set_xlabel("threshold")
        ax.set_ylabel(metric.upper() if metric == "iou" else "F1")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out
