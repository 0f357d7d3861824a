"""An ignite handler that records, during one evaluation pass, everything the report needs.

Per item: label, class probabilities, and for positives with a reference mask the explanation scores at
every sweep threshold, the localisation scores (:mod:`due_ext.metrics.localisation`) and the faithfulness
scores; for the first ``n_figures`` such positives also the image, mask and CAM volumes (for the overlay
figure). The same explanation and localisation scores are recorded for the two floors
(:mod:`due_ext.metrics.floors`): the centred Gaussian blob of the mean lesion size of the evaluated positives
(scored at the end of the pass, once that mean is known; the masks are kept bit-packed until then) and, when an
``initial_network`` factory is given, the Grad-CAM of that network built with ``initial_seed``. At the end of the
pass it writes ``RUN_DIR/evaluation.npz`` and the report (:func:`due_ext.report.summary.write_report`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from due_ext.data.atomic import atomic_destination
from due_ext.metrics.explanation import (
    EXPLANATION_THRESHOLDS,
    activation_recall,
    explanation_scores,
    explanation_sweep,
)
from due_ext.metrics.faithfulness import FILLS, comprehensiveness, sufficiency
from due_ext.metrics.floors import gaussian_blob, initial_network, mean_lesion_voxels, network_cam
from due_ext.metrics.localisation import LOCALISATION_THRESHOLDS, localisation_scores
from due_ext.report.summary import EVALUATION_FILE, FLOOR_PREFIX, write_report

#: Positives scored at once when the Gaussian-blob floor is computed (bounds the float64 working memory).
_FLOOR_CHUNK = 8


def _floor_scores(saliency: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each floor is scored with: IoU and F1 at the report threshold and the localisation metrics."""
    at_half = explanation_scores(saliency, mask)
    return {"iou": at_half["iou"], "f1": at_half["f1"], **localisation_scores(saliency, mask)}


class EvaluationRecorder:
    """Attach to an :class:`~due_ext.engines.evaluator.ExplanationEvaluator`; writes the run report.

    Args:
        output_dir: the run folder (created).
        n_figures: positives whose volumes are kept for the overlay figure.
        faithfulness: also compute comprehensiveness and sufficiency (4 extra forward passes per batch).
        threshold: binarisation threshold of the explanation for faithfulness.
        initial_network: a factory of the evaluated architecture (e.g. the bundle's network definition in
            ``_mode_: callable``); given, its Grad-CAM at initialisation is recorded as a floor (one extra
            forward per batch of positives, at the evaluator's ``target_layer``).
        initial_seed: the seed the initial network is built with (the run's seed).
        blob_floor: record the centred Gaussian blob floor.
    """

    def __init__(self, output_dir: str | Path, n_figures: int = 4, faithfulness: bool = True,
                 threshold: float = 0.5, initial_network: Callable[[], nn.Module] | None = None,
                 initial_seed: int = 0, blob_floor: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.n_figures = n_figures
        self.faithfulness = faithfulness
        self.threshold = threshold
        self.initial_network_factory = initial_network
        self.initial_seed = initial_seed
        self.blob_floor = blob_floor
        self._initial: nn.Module | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, _engine: Engine) -> None:
        self.rows: dict[str, list[np.ndarray]] = {"label": [], "prob": []}
        self.positives: dict[str, list[np.ndarray]] = {}
        self.volumes: dict[str, list[np.ndarray]] = {"image": [], "mask": [], "cam": []}
        self.floors: dict[str, list[np.ndarray]] = {}
        self.packed_masks: list[tuple[tuple[int, ...], np.ndarray]] = []

    def _append(self, key: str, value: torch.Tensor) -> None:
        self.positives.setdefault(key, []).append(value.detach().double().cpu().numpy())

    def _record_floor(self, floor: str, saliency: torch.Tensor, mask: torch.Tensor) -> None:
        for name, values in _floor_scores(saliency, mask).items():
            self.floors.setdefault(f"{floor}/{name}", []).append(values.double().cpu().numpy())

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
        for name, values in localisation_scores(cam, mask).items():  # energy_pointing_game = saliency precision
            self._append(name, values)
        if self.blob_floor:
            binary = (mask > 0.5).cpu().numpy()
            self.packed_masks += [(binary.shape[1:], np.packbits(m.reshape(-1))) for m in binary]
        if self.initial_network_factory is not None:
            if self._initial is None:
                self._initial = initial_network(self.initial_network_factory, self.initial_seed)
            self._record_floor("initial_cam", network_cam(self._initial, image, engine.target_layer), mask)
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

    def _record_blob_floor(self) -> None:
        """Score the centred Gaussian blob of the mean lesion size against every kept mask, in recording order."""
        masks = [torch.from_numpy(np.unpackbits(bits, count=math.prod(shape)).reshape(shape))
                 for shape, bits in self.packed_masks]
        if not any(bool(m.any()) for m in masks):
            return
        lesion_voxels = mean_lesion_voxels(masks)
        blobs: dict[tuple[int, ...], torch.Tensor] = {}
        start = 0
        while start < len(masks):  # runs of one volume shape, at most _FLOOR_CHUNK long
            shape, stop = masks[start].shape, start + 1
            while stop < len(masks) and stop - start < _FLOOR_CHUNK and masks[stop].shape == shape:
                stop += 1
            blob = blobs.setdefault(tuple(shape), gaussian_blob(shape, lesion_voxels))
            mask = torch.stack(masks[start:stop]).double()
            self._record_floor("gaussian_blob", blob.expand_as(mask), mask)
            start = stop
        self.floors["gaussian_blob/lesion_voxels"] = [np.asarray([lesion_voxels])]

    def _write(self, _engine: Engine) -> None:
        if self.blob_floor and self.packed_masks:
            self._record_blob_floor()
        arrays = {k: np.concatenate(v) for k, v in self.rows.items()}
        arrays.update({f"pos/{k}": np.concatenate(v) for k, v in self.positives.items()})
        arrays.update({f"{FLOOR_PREFIX}{k}": np.concatenate(v) for k, v in self.floors.items()})
        arrays.update({f"fig/{k}": np.stack(v) for k, v in self.volumes.items() if v})
        arrays["thresholds"] = np.asarray(EXPLANATION_THRESHOLDS)
        arrays["localisation_thresholds"] = np.asarray(LOCALISATION_THRESHOLDS)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_destination(self.output_dir / EVALUATION_FILE, suffix=".tmp.npz") as tmp:
            np.savez_compressed(tmp, **arrays)
        write_report(self.output_dir)
