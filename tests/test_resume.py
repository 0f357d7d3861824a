"""Exact resume: a run killed with SIGKILL after epoch 2 and restarted reaches the same weights as an
uninterrupted run with the same seed; inference refuses missing weights."""

import subprocess
import sys
import textwrap

import pytest
import torch

from due_ext.engines import latest_checkpoint, load_network_weights, save_state_dict

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from ignite.engine import Events
    from torch.utils.data import DataLoader
    sys.path.insert(0, {tests!r})
    from test_engines import tiny_batch, tiny_resnet
    from due_ext.engines import EpochSeeder, ExplanationTrainer, TrainingCheckpoint, save_state_dict
    from due_ext.explain.supervision import ExplanationSupervision

    out, kill_after = sys.argv[1], int(sys.argv[2])
    batch = tiny_batch(0)
    items = [{{k: v[i] for k, v in batch.items()}} for i in range(4)]
    loader = DataLoader(items * 2, batch_size=3, shuffle=True)  # order depends on the epoch's seed
    network = tiny_resnet(seed=1)
    optimizer = torch.optim.Adam(network.parameters(), 1e-3)
    trainer = ExplanationTrainer(device=torch.device("cpu"), max_epochs=3, train_data_loader=loader,
                                 network=network, optimizer=optimizer, supervision=ExplanationSupervision("due"))
    EpochSeeder(seed=7).attach(trainer)
    objects = {{"network": network, "optimizer": optimizer}}
    TrainingCheckpoint(out + "/ckpt", objects).attach(trainer)
    if kill_after:
        @trainer.on(Events.EPOCH_COMPLETED(once=kill_after))
        def _die(engine):
            os.kill(os.getpid(), 9)
    trainer.run()
    save_state_dict(network.state_dict(), out + "/final.pt")
""")


def _run(script, out, kill_after):
    return subprocess.run([sys.executable, str(script), str(out), str(kill_after)], capture_output=True, text=True,
                          env={"DUE_EXT_BACKEND": "reference", "PATH": "/usr/bin:/bin"})


def test_sigkill_then_resume_reaches_the_same_weights(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent)))
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert _run(script, straight, 0).returncode == 0
    killed = _run(script, interrupted, 2)
    assert killed.returncode == -9  # really killed, after epoch 2's checkpoint
    assert latest_checkpoint(interrupted / "ckpt").name == "checkpoint_epoch=2.pt"
    assert not (interrupted / "final.pt").exists()
    resumed = _run(script, interrupted, 0)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(straight / "final.pt", weights_only=True)
    b = torch.load(interrupted / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


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
