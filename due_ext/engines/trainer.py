"""The explanation-supervised trainer: MONAI's ``SupervisedTrainer`` whose iteration runs one
:class:`~due_ext.explain.supervision.ExplanationSupervision` objective (one forward pass for the whole batch,
cross-entropy on all items, the fused explanation loss on annotated positives, one backward), with the guards a
long run needs: optional mixed precision, gradient-norm clipping, and a stop that names the batch's cases when
the loss or its gradient stops being finite."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from due_ext.data import schema
from due_ext.engines.batches import batch_item_names, batch_to_device, describe_items
from due_ext.explain.supervision import ExplanationSupervision, SupervisionOutput

__all__ = ["AMP_DTYPES", "ExplanationTrainer", "NonFiniteLossError", "autocast_dtype", "batch_to_device"]

#: Values of the ``amp`` key besides ``false`` (off) and ``true`` (fp16 on CUDA, bf16 elsewhere).
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def nonfinite_input_keys(batch: Mapping[str, Any]) -> list[list[str]]:
    """Per item of a collated batch, the floating-point keys holding a NaN or Inf."""
    count = len(batch[schema.IMAGE])
    found: list[list[str]] = [[] for _ in range(count)]
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0 and len(value) == count:
            for i in (~torch.isfinite(value.detach().reshape(count, -1)).all(1)).nonzero().flatten().tolist():
                found[i].append(key)
    return found


class NonFiniteLossError(FloatingPointError):
    """The loss or its gradient became NaN or Inf; raised before the optimizer step so the weights stay the last
    good ones."""


def autocast_dtype(amp: bool | str | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype the ``amp`` setting asks for on ``device``, or ``None`` for full precision.

    ``true`` picks fp16 on CUDA (what MONAI's ``amp=True`` means) and bf16 elsewhere (CPU autocast's type);
    fp16 needs CUDA (its gradients need the scaler, and CPU kernels for it are slow where they exist)."""
    if amp is None or amp is False:
        return None
    device_type = torch.device(device).type
    if amp is True:
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be false, true, 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and device_type != "cuda":
        raise ValueError(f"amp 'fp16' needs a CUDA device, the trainer runs on {device_type}; use amp 'bf16'")
    return AMP_DTYPES[amp]


class ExplanationTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` driven by an explanation-supervision objective.

    Args:
        supervision: the objective (method, lambda, Grad-CAM layer); also accepted as ``loss_function``.
        amp: mixed precision for the forward pass and the loss: ``False`` (default), ``"bf16"``, ``"fp16"``
            (CUDA only, with a gradient scaler) or ``True`` (see :func:`autocast_dtype`). MONAI's own ``amp``
            is CUDA fp16 only, so this trainer handles the setting itself.
        grad_clip_norm: clip the global L2 norm of the gradients to this value before each step; ``None``
            (default) leaves them as they are.
        Every other argument is ``monai.engines.SupervisedTrainer``'s (``loss_function`` is not needed).

    ``engine.state.output`` holds ``image``, ``label``, ``pred`` (logits, detached), ``loss`` (total),
    ``prediction_loss`` and ``explanation_loss`` (batch means over their items) and ``grad_norm`` (before
    clipping), as floats for the loss terms and the norm.

    Before every step the global gradient norm is computed: a non-finite one stops training (as a non-finite
    loss does) unless the fp16 gradient scaler is active, which skips that step and lowers its scale instead.
    """

    def __init__(self, *args: Any, supervision: ExplanationSupervision | None = None, amp: bool | str | None = False,
                 grad_clip_norm: float | None = None, **kwargs: Any) -> None:
        supervision = supervision if supervision is not None else kwargs.pop("loss_function", None)
        if not isinstance(supervision, ExplanationSupervision):
            raise TypeError("ExplanationTrainer needs supervision=ExplanationSupervision(...)")
        if grad_clip_norm is not None and not grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be positive or None, got {grad_clip_norm}")
        kwargs.setdefault("decollate", False)
        super().__init__(*args, loss_function=supervision, amp=False, **kwargs)
        self.supervision = supervision
        self.grad_clip_norm = grad_clip_norm
        self.device_type = torch.device(self.state.device).type
        self.amp_dtype = autocast_dtype(amp, self.state.device)
        # disabled unless fp16 on CUDA: then scale/unscale_/step/update are plain pass-throughs
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)

    def state_dict(self) -> dict[str, Any]:
        """ignite's engine state (epoch, iteration) and the gradient scaler's, so an fp16 run resumes exactly."""
        return {**super().state_dict(), "grad_scaler": self.grad_scaler.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state = dict(state_dict)
        scaler = state.pop("grad_scaler", {})
        super().load_state_dict(state)
        if scaler:
            self.grad_scaler.load_state_dict(scaler)

    def _stop(self, what: str, result: SupervisionOutput, batch: Mapping[str, Any]) -> NonFiniteLossError:
        """The error naming the cases most likely at fault: those with a non-finite input value, else those with
        a non-finite logit or explanation loss (batch normalisation spreads one item's NaN over the batch, so
        the inputs are looked at first), else every item of the batch."""
        names = batch_item_names(batch)
        inputs = [f"{name} ({', '.join(keys)})" for name, keys in zip(names, nonfinite_input_keys(batch), strict=True)
                  if keys]
        bad = ~torch.isfinite(result.logits.detach()).all(1) | ~torch.isfinite(result.explanation_loss.detach())
        outputs = [n for n, b in zip(names, bad.tolist(), strict=True) if b]
        if inputs:
            items = f"items with non-finite input values: {describe_items(inputs)}"
        elif outputs:
            items = f"items with a non-finite logit or explanation loss: {describe_items(outputs)}"
        else:
            items = f"items of the batch: {describe_items(names)}"
        return NonFiniteLossError(
            f"non-finite {what} at epoch {self.state.epoch}, iteration {self.state.iteration}; {items}. Training "
            "stopped before the optimizer step; the last saved checkpoint is the last good one")

    def _iteration(self, engine: ExplanationTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = batch_to_device(batchdata, engine.state.device, engine.non_blocking)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(engine.device_type, dtype=engine.amp_dtype, enabled=engine.amp_dtype is not None):
            result = engine.supervision(engine.network, batch)
        engine.state.output = {Keys.IMAGE: batch[schema.IMAGE], Keys.LABEL: batch[schema.LABEL],
                               Keys.PRED: result.logits}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        if not torch.isfinite(result.loss):
            raise engine._stop(f"loss {result.loss.item()} (prediction {result.prediction_loss.item()}, explanation "
                               f"{result.explanation_loss.sum().item()})", result, batch)
        engine.state.output[Keys.LOSS] = result.loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.grad_scaler.scale(result.loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        grad_norm = engine._unscaled_grad_norm()
        if not torch.isfinite(grad_norm) and not engine.grad_scaler.is_enabled():
            raise engine._stop(f"gradient (global norm {grad_norm.item()})", result, batch)
        engine.grad_scaler.step(engine.optimizer)  # skips the step on a non-finite fp16 gradient
        engine.grad_scaler.update()
        n_supervised = int(result.supervised.sum())
        engine.state.output.update({
            Keys.PRED: result.logits.detach(),
            Keys.LOSS: result.loss.detach(),
            "prediction_loss": float(result.prediction_loss.detach()),
            "explanation_loss": float(result.explanation_loss.detach().sum()) / max(1, n_supervised),
            "supervised": n_supervised,
            "grad_norm": float(grad_norm),
        })
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _unscaled_grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients the optimizer will apply (unscaled), clipped to ``grad_clip_norm``
        when set; returns the norm before clipping."""
        self.grad_scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.grad_clip_norm is not None and torch.isfinite(norm):
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip_norm, norm)
        return norm
