"""Checkpoints that survive a crash and resume exactly.

- :class:`TrainingCheckpoint` (on the trainer): after every epoch, once the epoch's other handlers (validation
  included) have run, atomically saves the state dicts of the network, optimizer, trainer (epoch/iteration,
  gradient scaler) and anything else given, such as the validation evaluator (its best metric and best epoch,
  :class:`~due_ext.engines.evaluator.ExplanationEvaluator`); on start, resumes from the newest one
  (``weights_only=True``). Together with :class:`EpochSeeder` (random state of epoch ``e`` depends only on
  ``(seed, e)``), an interrupted run that resumes reaches the same weights and keeps the same best model as an
  uninterrupted one.
- :class:`BestModelSaver` (on the validation evaluator): writes the network's plain state dict whenever the
  evaluator's key metric improves (the model selection of the paper: validation PR-AUC).
- :func:`load_network_weights`: the strict, loud loader inference uses.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from monai.utils import set_determinism

from due_ext.data.atomic import atomic_destination

logger = logging.getLogger("due_ext.engines")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")


def save_state_dict(state: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` through a temporary file and rename: a crash never leaves a truncated checkpoint."""
    with atomic_destination(path, suffix=".tmp.pt") as tmp:
        torch.save(state, tmp)
    return Path(path)


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The ``checkpoint_epoch=N.pt`` with the largest N in ``directory``, or ``None``."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return max(found)[1] if found else None


class TrainingCheckpoint:
    """Save ``objects`` (name -> object with ``state_dict``/``load_state_dict``) and the trainer it is attached
    to (as ``"trainer"``: epoch and iteration) after each epoch; resume from the newest on start.

    The save is registered when the trainer starts, so it runs after every ``EPOCH_COMPLETED`` handler attached
    before (``ValidationHandler`` wherever it sits in the handler list): the checkpoint of epoch ``e`` holds
    the model selection of epoch ``e``'s validation. A kill between that validation and the save resumes
    from epoch ``e - 1`` and repeats epoch ``e`` identically.

    Why not MONAI's ``CheckpointSaver``/``CheckpointLoader`` (ignite ``Checkpoint``): the loader needs one
    fixed, existing file named at configuration time, while a run that is started again with the same command
    must resume from the newest checkpoint if there is one and start fresh otherwise.

    Args:
        directory: where ``checkpoint_epoch=N.pt`` files go.
        objects: e.g. ``{"network": net, "optimizer": opt, "validator": evaluator}``.
        resume: load the newest checkpoint when the trainer starts.
        keep_last: how many epoch checkpoints to keep.
        save: write checkpoints (``False`` on the non-main processes of a multi-process run, which only resume).
    """

    def __init__(self, directory: str | Path, objects: dict[str, Any], resume: bool = True, keep_last: int = 1,
                 save: bool = True) -> None:
        self.directory = Path(directory)
        self.objects = objects
        self.resume = resume
        self.keep_last = max(1, keep_last)
        self.save_enabled = save

    def attach(self, engine: Engine) -> None:
        self.objects = {**self.objects, "trainer": engine}
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load_latest)
        if self.save_enabled:
            engine.add_event_handler(Events.STARTED, self._register_save)

    def _register_save(self, engine: Engine) -> None:
        # registered at STARTED, after every handler the configuration attached: the save runs last
        if not engine.has_event_handler(self.save, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def load_latest(self, engine: Engine) -> None:
        path = latest_checkpoint(self.directory)
        if path is None:
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing = [name for name in self.objects if name not in state]
        if missing:
            raise RuntimeError(f"{path}: checkpoint lacks {missing}; delete it to start over")
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])
        logger.info("resumed from %s (epoch %d of %d)", path, engine.state.epoch, engine.state.max_epochs)

    def save(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        save_state_dict({name: obj.state_dict() for name, obj in self.objects.items()},
                        self.directory / f"checkpoint_epoch={epoch}.pt")
        kept = sorted((int(m.group(1)), p) for p in self.directory.iterdir()
                      if (m := CHECKPOINT_PATTERN.match(p.name)))
        for _, old in kept[:-self.keep_last]:
            old.unlink(missing_ok=True)


class EpochSeeder:
    """Seed every random generator at the start of epoch ``e`` with ``seed + e`` (``monai.utils.set_determinism``),
    so data order and random transforms of an epoch do not depend on what ran before it (exact resume).

    Args:
        seed: the run's seed.
        dataset: the training dataset, whose MONAI random transforms keep their own generators: with
            ``num_workers=0`` MONAI's ``DataLoader`` seeds them once, when it is built, so they would carry their
            state from epoch to epoch (and restart from scratch after a resume); they are reseeded here too.
            (Worker processes reseed their copies from the global generator each epoch, which ``seed`` covers.)
    """

    def __init__(self, seed: int = 0, dataset: object | None = None) -> None:
        self.seed = int(seed)
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        set_determinism(seed=self.seed + engine.state.epoch)
        if self.dataset is not None:
            set_rnd(self.dataset, self.seed + engine.state.epoch)


class BestModelSaver:
    """On the evaluator: write ``network.state_dict()`` to ``path`` whenever the key metric is a new best."""

    def __init__(self, network: torch.nn.Module, path: str | Path) -> None:
        self.network = network
        self.path = Path(path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.best_metric_epoch == engine.state.epoch:
            save_state_dict(self.network.state_dict(), self.path)
            logger.info("new best %s at epoch %d: saved %s", engine.state.key_metric_name, engine.state.epoch,
                        self.path)


def load_network_weights(network: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a plain state dict (``weights_only=True``, strict) into ``network``; fail loudly when missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model weights not found; train the bundle first (train.json) or pass "
                                "the checkpoint path")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    network.load_state_dict(state, strict=True)
    return network
