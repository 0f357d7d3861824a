"""Grad-CAM overlays in TensorBoard: what the network looks at, epoch after epoch of validation."""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers.tensorboard_handlers import TensorBoardHandler

from due_ext.engines.batches import batch_item_names
from due_ext.engines.writers import _stem


class TensorBoardCamHandler(TensorBoardHandler):
    """Attach to an :class:`~due_ext.engines.evaluator.ExplanationEvaluator`; at every evaluation epoch, writes
    the first ``n_images`` positives that have a reference mask as TensorBoard images ``<tag_name>/<case>``: the
    Grad-CAM over the image on the axial slice where the mask is largest, the mask outlined
    (:func:`due_ext.report.figures.cam_overlay`, the picture of the test report's overlay figure). The step is the
    evaluator's epoch, which ``ValidationHandler`` sets to the trainer's.

    MONAI's ``TensorBoardImageHandler`` is not used: it plots one item (``index``) of the epoch's last batch only,
    so it cannot pick the positives, and it shows a 3D volume as a grey GIF per channel, with no CAM over the
    image. The validation loader is not shuffled, so the same cases are shown every epoch.

    Args:
        summary_writer: a ``SummaryWriter``; ``None`` creates one writing to ``log_dir``.
        log_dir: the TensorBoard folder (the run's ``output_dir``, where the stats handlers write).
        n_images: positives shown per epoch.
        tag_name: the images' tag prefix.
    """

    def __init__(self, summary_writer: Any = None, log_dir: str = "./runs", n_images: int = 4,
                 tag_name: str = "val_cam") -> None:
        if n_images < 1:
            raise ValueError(f"TensorBoardCamHandler: n_images must be at least 1, got {n_images}")
        super().__init__(summary_writer=summary_writer, log_dir=log_dir)
        self.n_images = n_images
        self.tag_name = tag_name
        self._written = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write_batch)
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _engine: self._writer.flush())

    def _reset(self, _engine: Engine) -> None:
        self._written = 0

    def _write_batch(self, engine: Engine) -> None:
        from due_ext.report.figures import cam_overlay, lesion_slice

        out: dict[str, Any] = engine.state.output
        if self._written >= self.n_images or out["mask"] is None:
            return
        shown = (out["has_mask"] & (out["label"].reshape(-1) == 1)).nonzero().flatten().tolist()
        names = batch_item_names({"image": out["image"]})
        for i in shown[: self.n_images - self._written]:
            image, mask, cam = (torch.as_tensor(v).detach().float().cpu().numpy()
                                for v in (out["image"][i, 0], out["mask"][i], out["cam"][i]))
            z = lesion_slice(mask > 0.5)
            picture = cam_overlay(image[..., z], cam[..., z], mask[..., z])
            self._writer.add_image(f"{self.tag_name}/{_stem(names[i])}", picture, engine.state.epoch,
                                   dataformats="HWC")
            self._written += 1
