"""Kill a DUE bundle run and resume it with the same command: it must end exactly where an uninterrupted run ends
(tests/fault_injection.py does the killing; its random sweep of 30+ kills is run by hand, figures in
bundles/due/docs/README.md). Tiny runs on phantom data, one thread."""

import random
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fault_injection as faults  # noqa: E402

pytestmark = pytest.mark.slow
SCENARIO = faults.Scenario(method="due", max_epochs=6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    outcome, history = faults.reference_run(SCENARIO, work)
    return work, outcome, history


def test_kill_right_after_a_better_epoch_keeps_its_model(reference):
    """The reported defect: the run killed right after an epoch that set the best validation score, resumed, let
    the next (not better) epoch overwrite models/model.pt."""
    work, outcome, history = reference
    placed = faults.after_better_epoch(history)
    assert placed, f"this scenario's validation history {history} has no better epoch followed by a worse one"
    trial = faults.run_trial(SCENARIO, outcome, placed[:1], work / "placed", random.Random(0))
    assert trial.kills == [placed[0].phase]
    assert trial.identical, trial.differences
    assert not trial.half_written


def test_kills_in_every_phase_in_one_run_resume_to_the_same_end(reference):
    """One run killed during the derivation, then (rerun) at a checkpoint, during validation and during the test
    evaluation: each rerun resumes, the last finishes identical to the uninterrupted run."""
    work, outcome, _ = reference
    kills = [faults.KILL_POINTS[phase] for phase in ("derivation", "checkpoint", "validation", "test")]
    trial = faults.run_trial(SCENARIO, outcome, kills, work / "phases", random.Random(1))
    assert trial.kills == ["derivation", "checkpoint", "validation", "test"]
    assert trial.identical, trial.differences
    assert not trial.half_written


def test_a_corrupted_derived_file_is_detected_and_rebuilt(reference):
    """A derived weights volume truncated after a finished run (a full disk, say): the same command notices it,
    derives that unit again, bit for bit, and finishes with the same test metrics."""
    work, outcome, _ = reference
    root, cache = work / "reference" / "bundle", work / "reference" / "cache"
    weights = sorted(cache.rglob("derived-*/uncertainty/weights/*.nii.gz"))
    assert weights
    original = weights[0].read_bytes()
    weights[0].write_bytes(original[: len(original) // 2])
    log: list[str] = []
    faults.run_until(SCENARIO.args(root), faults._environment(cache), None, random.Random(0), log)
    assert any("deriving them again" in line for line in log)
    assert weights[0].read_bytes() == original
    assert faults.outcome(root).metrics == outcome.metrics


def test_half_written_files_are_recognised(tmp_path):
    """The checker itself: a truncated checkpoint and a truncated NIfTI are reported, temporaries are not files."""
    import torch

    from due_ext.data.nifti import write_nifti

    torch.save({"w": torch.ones(1000)}, tmp_path / "good.pt")
    shutil.copy(tmp_path / "good.pt", tmp_path / "bad.pt")
    (tmp_path / "bad.pt").write_bytes((tmp_path / "bad.pt").read_bytes()[:100])
    import numpy as np

    write_nifti(tmp_path / "bad.nii.gz", np.random.default_rng(0).random((8, 8, 8)))
    (tmp_path / "bad.nii.gz").write_bytes((tmp_path / "bad.nii.gz").read_bytes()[:200])
    (tmp_path / ".model.pt.abc.tmp.pt").write_bytes(b"partial")
    files = faults.finished_files(tmp_path)
    assert sorted(p.name for p in files) == ["bad.nii.gz", "bad.pt", "good.pt"]
    assert sorted(entry.split(":")[0] for entry in faults.half_written(files)) == ["bad.nii.gz", "bad.pt"]
