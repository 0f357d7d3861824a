"""Exact resume: a run killed with SIGKILL after epoch 2 and restarted reaches the same weights, and keeps the
same best model, as an uninterrupted run with the same seed; inference refuses missing weights."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from due_ext.engines import latest_checkpoint, load_network_weights, save_state_dict

#: validation key metric of epochs 1, 2, 3: epoch 2 is the best and is followed by a worse epoch 3 that still
#: beats epoch 1, so a resume that forgets (or saves before) epoch 2's validation would keep epoch 3
VALIDATION_SCRIPT = (0.5, 0.9, 0.7)

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from ignite.engine import Events
    from ignite.metrics import Metric
    from monai.handlers import ValidationHandler
    from torch.utils.data import DataLoader
    sys.path.insert(0, {tests!r})
    from test_engines import tiny_batch, tiny_resnet
    from due_ext.engines import (BestModelSaver, EpochSeeder, ExplanationEvaluator, ExplanationTrainer,
                                 TrainingCheckpoint, save_state_dict)
    from due_ext.explain.supervision import ExplanationSupervision

    class ScriptedMetric(Metric):
        # the validation score of each epoch, fixed in advance: the test decides which epoch is best
        def reset(self):
            pass
        def update(self, output):
            pass
        def iteration_completed(self, engine):
            self.epoch = engine.state.epoch
        def compute(self):
            return {scores!r}[self.epoch - 1]

    out, kill_after = sys.argv[1], int(sys.argv[2])
    batch = tiny_batch(0)
    items = [{{k: v[i] for k, v in batch.items()}} for i in range(4)]
    loader = DataLoader(items * 2, batch_size=3, shuffle=True)  # order depends on the epoch's seed
    network = tiny_resnet(seed=1)
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)
    validator = ExplanationEvaluator(device=torch.device("cpu"), val_data_loader=[tiny_batch(1)], network=network,
                                     key_val_metric={{"val_scripted": ScriptedMetric()}},
                                     val_handlers=[BestModelSaver(network, out + "/model.pt")])
    trainer = ExplanationTrainer(device=torch.device("cpu"), max_epochs=3, train_data_loader=loader,
                                 network=network, optimizer=optimizer, supervision=ExplanationSupervision("due"))
    EpochSeeder(seed=7).attach(trainer)
    # attached before the validation handler, as in bundles/due/train.json
    TrainingCheckpoint(out + "/ckpt", {{"network": network, "optimizer": optimizer, "validator": validator}}
                       ).attach(trainer)
    ValidationHandler(validator=validator, epoch_level=True, interval=1).attach(trainer)
    if kill_after:
        @trainer.on(Events.EPOCH_STARTED(once=kill_after + 1))
        def _die(engine):  # everything of epoch `kill_after` has run, validation and checkpoint included
            os.kill(os.getpid(), 9)
    trainer.run()
    save_state_dict(network.state_dict(), out + "/final.pt")
    with open(out + "/best.json", "w") as f:
        json.dump({{"best_metric": validator.state.best_metric,
                   "best_metric_epoch": validator.state.best_metric_epoch}}, f)
""")


def _run(script, out, kill_after):
    return subprocess.run([sys.executable, str(script), str(out), str(kill_after)], capture_output=True, text=True,
                          env={"DUE_EXT_BACKEND": "reference", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def straight_and_resumed(tmp_path_factory):
    """One uninterrupted 3-epoch run, and one killed after epoch 2 then started again with the same command."""
    tmp = tmp_path_factory.mktemp("resume")
    script = tmp / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), scores=VALIDATION_SCRIPT))
    straight, interrupted = tmp / "straight", tmp / "interrupted"
    run = _run(script, straight, 0)
    assert run.returncode == 0, run.stderr
    killed = _run(script, interrupted, 2)
    assert killed.returncode == -9, killed.stderr  # really killed, after epoch 2's checkpoint
    assert latest_checkpoint(interrupted / "ckpt").name == "checkpoint_epoch=2.pt"
    assert not (interrupted / "final.pt").exists()
    best_before_resume = (interrupted / "model.pt").read_bytes()
    resumed = _run(script, interrupted, 0)
    assert resumed.returncode == 0, resumed.stderr
    return straight, interrupted, best_before_resume


def _assert_same_weights(a_path, b_path):
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_sigkill_then_resume_reaches_the_same_weights(straight_and_resumed):
    straight, interrupted, _ = straight_and_resumed
    _assert_same_weights(straight / "final.pt", interrupted / "final.pt")


def test_resume_keeps_the_best_model_of_before_the_kill(straight_and_resumed):
    """The best epoch (2) was validated before the kill; the worse epoch 3 after the resume must not replace it."""
    straight, interrupted, best_before_resume = straight_and_resumed
    expected = {"best_metric": max(VALIDATION_SCRIPT), "best_metric_epoch": 2}
    assert json.loads((straight / "best.json").read_text()) == expected
    assert json.loads((interrupted / "best.json").read_text()) == expected
    assert (interrupted / "model.pt").read_bytes() == best_before_resume  # not rewritten after the resume
    _assert_same_weights(straight / "model.pt", interrupted / "model.pt")
    final = torch.load(interrupted / "final.pt", weights_only=True)
    best = torch.load(interrupted / "model.pt", weights_only=True)
    assert not torch.equal(final["conv1.weight"], best["conv1.weight"])  # epoch 3 did train on


def test_load_network_weights_is_strict_and_loud(tmp_path):
    from test_engines import tiny_resnet

    with pytest.raises(FileNotFoundError, match="model weights not found"):
        load_network_weights(tiny_resnet(), tmp_path / "missing.pt")
    save_state_dict({"conv1.weight": torch.zeros(1)}, tmp_path / "partial.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_network_weights(tiny_resnet(), tmp_path / "partial.pt")
    source = tiny_resnet(seed=3)
    save_state_dict(source.state_dict(), tmp_path / "ok.pt")
    loaded = load_network_weights(tiny_resnet(seed=4), tmp_path / "ok.pt")
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)


def test_epoch_seeder_makes_random_transforms_of_an_epoch_independent_of_the_earlier_ones():
    """With num_workers=0 a MONAI random transform keeps its own generator across epochs: the epoch after a
    resume must draw what it draws in an uninterrupted run."""
    from ignite.engine import Engine
    from monai.data import DataLoader, Dataset
    from monai.transforms import RandScaleIntensityd
    from monai.utils import set_determinism

    from due_ext.engines import EpochSeeder

    def run(start_epoch: int) -> list[torch.Tensor]:
        set_determinism(seed=0)  # what a bundle's `initialize` does in a new process
        dataset = Dataset([{"x": torch.ones(1, 3)} for _ in range(4)], RandScaleIntensityd("x", factors=0.5, prob=1.0))
        drawn = []
        engine = Engine(lambda e, batch: drawn.append((e.state.epoch, batch["x"].clone())))
        EpochSeeder(seed=3, dataset=dataset).attach(engine)
        engine.load_state_dict({"epoch": start_epoch, "max_epochs": 3, "epoch_length": 2})
        engine.run(DataLoader(dataset, batch_size=2, shuffle=True, num_workers=0))
        return [x for epoch, x in drawn if epoch == 3]

    straight, resumed = run(0), run(2)
    assert len(straight) == len(resumed) == 2
    for a, b in zip(straight, resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
