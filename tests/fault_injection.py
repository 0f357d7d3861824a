"""Fault injection for DUE bundle runs: SIGKILL a training run at chosen or random points, resume it with the
same command, and check that it ends exactly where an uninterrupted run ends.

Used by ``tests/test_fault_injection.py`` (a few placed kills) and, as a script, for the long random sweep whose
figures are quoted in ``bundles/due/docs/README.md``::

    python tests/fault_injection.py --kills 30 --seed 0

A *scenario* is one tiny ``train.json`` run (phantom data, narrow network, one thread, fixed seed; ``--method
due`` so that the derivation of interpolation and weights is part of it). The uninterrupted run is the
reference. Each *trial* starts the same run in fresh folders, kills its process group when a *kill point*
fires (a log line that marks a phase, plus a random delay), checks that no finished file is half-written,
then reruns the same command to the end (a rerun may be killed again), and compares:

- the final weights (network of the last epoch's training checkpoint),
- the best model (``model.pt``) and which epoch it came from,
- the test metrics (``metrics.json``),

with the reference, bit for bit (one thread, same seed: the run is deterministic).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "bundles" / "due" / "train.json"
VALIDATION = re.compile(r"Epoch\[(\d+)\] Metrics -- .*val_pr_auc: ([0-9.]+)")


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A tiny, deterministic DUE bundle run."""

    method: str = "due"
    max_epochs: int = 6
    batch_size: int = 2
    seed: int = 0

    def args(self, root: Path) -> list[str]:
        return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(TRAIN), "--bundle_root", str(root),
                "--demo_dataset", "phantom", "--method", self.method, "--max_epochs", str(self.max_epochs),
                "--batch_size", str(self.batch_size), "--seed", str(self.seed), "--block_inplanes", "[4, 8, 8, 8]"]


@dataclasses.dataclass(frozen=True)
class KillPoint:
    """Kill ``delay`` seconds (drawn uniformly from ``[0, max_delay]``) after the ``occurrence``-th output line
    matching ``pattern``; ``phase`` names where that lands."""

    phase: str
    pattern: str
    max_delay: float = 0.0
    occurrence: int = 1


#: Where a kill can land, each with the log line that marks its start. The trainer saves its checkpoint when an
#: epoch's last iteration is done; validation follows; "after epoch" fires once every handler of the epoch ran.
KILL_POINTS = {
    "derivation": KillPoint("derivation", r"deriving interpolation and uncertainty weights", 3.0),
    "mid-epoch": KillPoint("mid-epoch", r"Epoch: \d+/\d+, Iter: 1/", 0.05),
    "checkpoint": KillPoint("checkpoint", r"Epoch: \d+/\d+, Iter: (\d+)/\1 ", 0.02),
    "validation": KillPoint("validation", r"ExplanationEvaluator - INFO - Engine run resuming from iteration 0", 0.03),
    "after-epoch": KillPoint("after-epoch", r"ExplanationTrainer - INFO - Epoch\[\d+\] Complete", 0.0),
    "test": KillPoint("test", r"ExplanationTrainer - INFO - Engine run finished", 0.3),
}


@dataclasses.dataclass
class Outcome:
    """What a finished run left: final weights, best model, test metrics."""

    final_weights: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor]
    metrics: dict

    def differences(self, other: Outcome) -> list[str]:
        found = []
        for name, mine, theirs in (("final weights", self.final_weights, other.final_weights),
                                   ("best model", self.best_model, other.best_model)):
            if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
                found.append(name)
        if self.metrics != other.metrics:
            found.append("test metrics")
        return found


@dataclasses.dataclass
class Trial:
    kills: list[str]
    missed: int
    identical: bool
    differences: list[str]
    best_model_lost: bool
    half_written: list[str]
    stale_temporaries: int


def _environment(cache: Path) -> dict[str, str]:
    return dict(os.environ, DUE_EXT_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _read_lines(stream, lines: queue.Queue) -> None:
    buffer = ""
    while chunk := stream.read(1):
        if chunk in "\r\n":
            if buffer:
                lines.put(buffer)
            buffer = ""
        else:
            buffer += chunk
    if buffer:
        lines.put(buffer)
    lines.put(None)


def run_until(args: Sequence[str], env: dict[str, str], kill: KillPoint | None, rng: random.Random,
              log: list[str] | None = None, timeout: float = 900.0) -> bool:
    """Run ``args``; with ``kill``, SIGKILL its process group once the kill point fires. Returns whether it was
    killed (``False``: it ran to the end first). A run that fails by itself raises with its output's tail."""
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               encoding="utf-8", errors="replace", start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    seen, deadline, output = 0, time.monotonic() + timeout, []
    killed = False
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            os.killpg(process.pid, signal.SIGKILL)
            raise TimeoutError(f"{' '.join(args)} ran past {timeout} s") from None
        if line is None:
            break
        output.append(line)
        if kill is not None and not killed and re.search(kill.pattern, line):
            seen += 1
            if seen == kill.occurrence:
                time.sleep(rng.uniform(0.0, kill.max_delay))
                os.killpg(process.pid, signal.SIGKILL)
                killed = True
    code = process.wait()
    if log is not None:
        log.extend(output)
    if killed and code == -signal.SIGKILL:
        return True
    if code != 0:
        raise RuntimeError(f"run failed with exit code {code}:\n" + "\n".join(output[-40:]))
    return False


def outcome(root: Path) -> Outcome:
    """Read what a finished run left under ``root`` (the bundle root)."""
    checkpoints = sorted((root / "eval").rglob("checkpoint_epoch=*.pt"),
                         key=lambda p: int(p.stem.split("=")[1]))
    final = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)["network"]
    best_models = sorted((root / "models").rglob("model.pt"))
    if len(best_models) != 1:
        raise RuntimeError(f"{root / 'models'}: expected one model.pt, found {best_models}")
    best = torch.load(best_models[0], map_location="cpu", weights_only=True)
    metrics = json.loads(next((root / "eval").rglob("test/metrics.json")).read_text())
    return Outcome(final, best, metrics)


def finished_files(*folders: Path) -> list[Path]:
    """Every file a run finished writing (not the temporaries of the atomic writer, named ``.NAME.*tmp*``)."""
    return [p for folder in folders if folder.exists() for p in folder.rglob("*")
            if p.is_file() and not is_temporary(p)]


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and ".tmp" in path.name


def half_written(files: Sequence[Path]) -> list[str]:
    """The files among ``files`` that do not load completely."""
    import nibabel as nib

    bad = []
    for path in files:
        try:
            if path.suffix == ".pt":
                torch.load(path, map_location="cpu", weights_only=True)
            elif path.name.endswith((".nii.gz", ".nii")):
                np.asarray(nib.load(path).dataobj)
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".npz":
                with np.load(path) as arrays:
                    [arrays[k] for k in arrays.files]
        except Exception as err:  # noqa: BLE001 - any failure to load is what we count
            bad.append(f"{path.name}: {type(err).__name__}")
    return bad


def reference_run(scenario: Scenario, work: Path) -> tuple[Outcome, list[float]]:
    """The uninterrupted run: its outcome and its validation PR-AUC per epoch."""
    root, cache = work / "reference" / "bundle", work / "reference" / "cache"
    root.mkdir(parents=True)
    log: list[str] = []
    run_until(scenario.args(root), _environment(cache), None, random.Random(0), log)
    history = [float(m.group(2)) for line in log if (m := VALIDATION.search(line))]
    return outcome(root), history


def after_better_epoch(history: Sequence[float]) -> list[KillPoint]:
    """Kill points right after each epoch that set a new best and is followed by one that does not improve on it:
    a resume that forgot the best score would let that epoch overwrite the best model."""
    points, best = [], float("-inf")
    for epoch, score in enumerate(history, start=1):
        if score > best:
            best = score
            if epoch < len(history) and history[epoch] <= score:
                points.append(KillPoint(f"after better epoch {epoch}",
                                        r"ExplanationTrainer - INFO - Epoch\[\d+\] Complete", 0.0, occurrence=epoch))
    return points


def run_trial(scenario: Scenario, reference: Outcome, kills: Sequence[KillPoint], work: Path,
              rng: random.Random) -> Trial:
    """Start the scenario, kill it at each of ``kills`` in turn (each on a rerun of the same command), then let
    the last rerun finish, and compare with the reference."""
    root, cache = work / "bundle", work / "cache"
    root.mkdir(parents=True)
    env, landed, missed, half = _environment(cache), [], 0, []
    for kill in kills:
        if run_until(scenario.args(root), env, kill, rng):
            landed.append(kill.phase)
            half += half_written(finished_files(root, cache))
        else:
            missed += 1  # the run finished before the kill point fired: later kills have nothing to kill
            break
    if not missed:
        run_until(scenario.args(root), env, None, rng)
    differences = outcome(root).differences(reference)
    stale = sum(1 for folder in (root, cache) for p in folder.rglob("*") if p.is_file() and is_temporary(p))
    return Trial(landed, missed, not differences, differences, "best model" in differences, half, stale)


def sweep(n_kills: int, seed: int, work: Path, scenario: Scenario = Scenario()) -> dict:
    """Random kills over every kill point plus the placed ones after better epochs; returns the figures."""
    rng = random.Random(seed)
    reference, history = reference_run(scenario, work)
    trials: list[Trial] = []
    placed = after_better_epoch(history)
    for i, kill in enumerate(placed):
        trials.append(run_trial(scenario, reference, [kill], work / f"placed{i}", rng))
    injected = 0
    index = 0
    phases = list(KILL_POINTS)  # in the order a run reaches them
    rotation: list[str] = []
    while injected < n_kills:
        # One to three kills per trial (a rerun may die again, as on a flaky cluster), phases drawn in shuffled
        # rounds so that every phase gets its share, and sorted in run order so that each can still be reached
        # by the rerun (a run killed in its test evaluation has no epoch left to be killed in).
        picked = []
        for _ in range(rng.randint(1, 3)):
            if not rotation:
                rotation = rng.sample(phases, len(phases))
            picked.append(rotation.pop())
        kills = [KILL_POINTS[phase] for phase in sorted(picked, key=phases.index)]
        trial = run_trial(scenario, reference, kills, work / f"random{index}", rng)
        trials.append(trial)
        injected += len(trial.kills)
        index += 1
        print(f"trial {index}: kills {trial.kills} -> {'identical' if trial.identical else trial.differences}",
              flush=True)
    return {
        "validation_history": history,
        "kills_injected": sum(len(t.kills) for t in trials),
        "kills_by_phase": dict(Counter(phase.split(" epoch")[0] for t in trials for phase in t.kills)),
        "placed_after_better_epoch": len(placed),
        "runs": len(trials),
        "runs_identical": sum(t.identical for t in trials),
        "best_models_lost": sum(t.best_model_lost for t in trials),
        "files_half_written": sum(len(t.half_written) for t in trials),
        "stale_temporaries": sum(t.stale_temporaries for t in trials),
        "kill_points_missed": sum(t.missed for t in trials),
        "differences": [t.differences for t in trials if not t.identical],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30, help="random kills to inject (besides the placed ones)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="due-faults-") as work:
        figures = sweep(options.kills, options.seed, Path(work))
    print(json.dumps(figures, indent=2))
    if options.out:
        options.out.write_text(json.dumps(figures, indent=2) + "\n")
    ok = figures["runs_identical"] == figures["runs"] and not figures["best_models_lost"] \
        and not figures["files_half_written"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
