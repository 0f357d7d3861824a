"""An ignite handler that records, during one evaluation pass, everything the report needs.

Per item: label, class probabilities, and for positives with a reference mask the explanation scores at
every sweep threshold and the faithfulness scores; for the first ``n_figures`` such positives also the
image, mask and CAM volumes (for the overlay figure). At the end of the pass it writes
``RUN_DIR/evaluation.npz`` and the report (:func:`due_ext.report.summary.write_report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from due_ext.data.atomic import atomic_destination
from due_ext.metrics.explanation import EXPLANATION_THRESHOLDS, activation_recall, explanation_sweep, saliency_precision
from due_ext.metrics.faithfulness import FILLS, comprehensiveness, sufficiency
from due_ext.report.summary import EVALUATION_FILE, write_report


class EvaluationRecorder:
    """Attach to an :class:`~due_ext.engines.evaluator.ExplanationEvaluator`; writes the run report.

    Args:
        output_dir: the run folder (created).
        n_figures: positives whose volumes are kept for the overlay figure.
        faithfulness: also compute comprehensiveness and sufficiency (4 extra forward passes per batch).
        threshold: binarisation threshold of the explanation for faithfulness.
    """

    def __init__(self, output_dir: str | Path, n_figures: int = 4, faithfulness: bool = True,
                 threshold: float = 0.5) -> None:
        self.output_dir = Path(output_dir)
        self.n_figures = n_figures
        self.faithfulness = faithfulness
        self.threshold = threshold

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, _engine: Engine) -> None:
        self.rows: dict[str, list[np.ndarray]] = {"label": [], "prob": []}
        self.positives: dict[str, list[np.ndarray]] = {}
        self.volumes: dict[str, list[np.ndarray]] = {"image": [], "mask": [], "cam": []}

    def _append(self, key: str, value: torch.Tensor) -> None:
        self.positives.setdefault(key, []).append(value.detach().double().cpu().numpy())

    def _record(self, engine: Engine) -> None:
        out: dict[str, Any] = engine.state.output
        labels = out["label"].reshape(-1)
        self.rows["label"].append(labels.cpu().numpy())
        self.rows["prob"].append(out["pred"].detach().float().cpu().numpy())
        keep = out["has_mask"] & (labels == 1)
        if out["mask"] is None or not keep.any():
            return
        cam, mask, image = out["cam"][keep], out["mask"][keep], out["image"][keep]
        for t, scores in explanation_sweep(cam, mask).items():
            for name, values in scores.items():
                self._append(f"{name}@{t:.1f}", values)
        self._append("activation_recall", activation_recall(cam, mask))
        self._append("saliency_precision", saliency_precision(cam, mask))
        if self.faithfulness:
            network, target = engine.network, labels[keep]
            was_training = network.training
            network.eval()
            try:
                for fill in FILLS:
                    self._append(f"comprehensiveness_{fill}",
                                 comprehensiveness(network, image, cam, target, self.threshold, fill))
                    self._append(f"sufficiency_{fill}", sufficiency(network, image, cam, target, self.threshold, fill))
            finally:
                network.train(was_training)
        room = self.n_figures - len(self.volumes["cam"])
        for i in range(min(room, cam.shape[0])):
            self.volumes["image"].append(image[i, 0].detach().float().cpu().numpy())
            self.volumes["mask"].append(mask[i].detach().float().cpu().numpy())
            self.volumes["cam"].append(cam[i].detach().float().cpu().numpy())

    def _write(self, _engine: Engine) -> None:
        arrays = {k: np.concatenate(v) for k, v in self.rows.items()}
        arrays.update({f"pos/{k}": np.concatenate(v) for k, v in self.positives.items()})
        arrays.update({f"fig/{k}": np.stack(v) for k, v in self.volumes.items() if v})
        arrays["thresholds"] = np.asarray(EXPLANATION_THRESHOLDS)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_destination(self.output_dir / EVALUATION_FILE, suffix=".tmp.npz") as tmp:
            np.savez_compressed(tmp, **arrays)
        write_report(self.output_dir)
