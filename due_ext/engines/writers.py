"""Inference outputs: per input volume, the class probabilities (one JSON for the run) and the Grad-CAM volume
(NIfTI on the input's grid, affine kept)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from due_ext.data.datalist import write_json_atomic
from due_ext.data.nifti import write_nifti

CLASS_NAMES = ("no_lesion", "lesion")


def _stem(path: str) -> str:
    name = os.path.basename(str(path))
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


class PredictionWriter:
    """Attach to an :class:`~due_ext.engines.evaluator.ExplanationEvaluator` running on unlabelled images.

    Writes ``<output_dir>/<stem>_gradcam.nii.gz`` for every input and ``<output_dir>/predictions.json`` =
    ``{stem: {"file": input path, "probabilities": {"no_lesion": p0, "lesion": p1}, "predicted": name}}``.

    Args:
        output_dir: folder of the outputs.
        preprocessing: the chain that made the evaluator's images; given, each Grad-CAM is mapped back onto its
            input file's own grid (shape and affine; :func:`due_ext.data.preprocessing.cams_on_input_grid`).
            ``None``: written on the network's grid with the preprocessed image's affine.
    """

    def __init__(self, output_dir: str | os.PathLike, preprocessing: Any = None) -> None:
        self.output_dir = Path(output_dir)
        self.preprocessing = preprocessing

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write_batch)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write_summary)

    def _reset(self, _engine: Engine) -> None:
        self.predictions: dict[str, Any] = {}

    def _write_batch(self, engine: Engine) -> None:
        out = engine.state.output
        image, probs, cams = out["image"], out["pred"].cpu().numpy(), out["cam"].detach().cpu().numpy()
        meta = getattr(image, "meta", {}) or {}
        files = meta.get("filename_or_obj", [f"volume_{engine.state.iteration}_{i}" for i in range(len(probs))])
        affines = getattr(image, "affine", None)
        if self.preprocessing is not None:
            from due_ext.data.preprocessing import cams_on_input_grid

            on_input = cams_on_input_grid(out["cam"], image, self.preprocessing)
            cams, affines = [c.numpy() for c in on_input], torch.stack([c.affine for c in on_input])
        for i, path in enumerate(files):
            stem = _stem(path)
            if stem in self.predictions and self.predictions[stem]["file"] != str(path):
                # e.g. case_1/image.nii.gz and case_2/image.nii.gz: one CAM would silently replace the other
                raise ValueError(f"{path}: its Grad-CAM would overwrite that of {self.predictions[stem]['file']} "
                                 f"({stem}_gradcam.nii.gz in {self.output_dir}); give the volumes distinct file names")
            affine = None if affines is None else torch.as_tensor(affines)[i].cpu().numpy()
            write_nifti(self.output_dir / f"{stem}_gradcam.nii.gz", cams[i].astype(np.float32), affine)
            self.predictions[stem] = {
                "file": str(path),
                "probabilities": {name: float(p) for name, p in zip(CLASS_NAMES, probs[i], strict=True)},
                "predicted": CLASS_NAMES[int(np.argmax(probs[i]))],
            }

    def _write_summary(self, _engine: Engine) -> None:
        write_json_atomic(self.output_dir / "predictions.json", self.predictions)
