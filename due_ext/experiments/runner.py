"""Run an experiment grid: every cell = train + evaluate through the DUE bundle, one subprocess per cell.

Layout of the output folder ``OUT``::

    OUT/experiment.json            the parsed experiment, the base datalist and the code revision of the launch
    OUT/datalists/trainN-seedS.json  the training subsets (validation and test sections unchanged)
    OUT/cells/<cell id>/result.json  the results row of a finished cell (written last, atomically)
    OUT/cells/<cell id>/log.txt      the cell's stdout and stderr
    OUT/cells/<cell id>/run/         bundle outputs: checkpoints, best model, test/metrics.json, figures
    OUT/results.jsonl              all finished rows, rewritten after every cell (for reading, not resuming)

Resuming: a cell whose ``result.json`` exists is skipped; any other cell (never started, crashed, killed) runs
again from scratch.

Nothing written holds an absolute path (:mod:`due_ext.experiments.paths`): a cell's ``spec.json`` and row name the
subset relative to ``OUT`` and the data root, bundle and base datalist as ``<cache>/...`` or ``<repository>/...``;
the subsets name their volumes relative to the data root. Results committed from one machine read the same on
another, and re-running the recorded command there writes the same files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from due_ext.experiments.cell import RESULT_FILE
from due_ext.experiments.config import Cell, Experiment, load_experiment

EXPERIMENT_FILE = "experiment.json"
RESULTS_FILE = "results.jsonl"


def code_revision() -> dict[str, Any]:
    """``git rev-parse HEAD`` of the repository holding this package and whether tracked files differ from it
    (``None`` values outside a git checkout)."""
    from due_ext.bundles import repository_root

    root = repository_root()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    changed = [line[3:] for line in status.stdout.splitlines()]
    return {"commit": head.stdout.strip(), "dirty": bool(changed), "changed": changed}


def read_rows(out: str | Path) -> list[dict[str, Any]]:
    """Every finished cell's row in ``out`` (sorted by cell id)."""
    cells = Path(out) / "cells"
    rows = [json.loads(p.read_text()) for p in sorted(cells.glob(f"*/{RESULT_FILE}"))] if cells.is_dir() else []
    return rows


def _write_results(out: Path) -> None:
    from due_ext.data.atomic import atomic_destination

    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in read_rows(out))
    with atomic_destination(out / RESULTS_FILE) as tmp:
        Path(tmp).write_text(lines)


def _run_one(experiment: Experiment, cell: Cell, out: Path, base: str, data_root: str, revision: dict[str, Any],
             threads: int, timeout: float | None) -> tuple[Cell, bool, float]:
    from due_ext.bundles import bundle_root
    from due_ext.data.datalist import write_json_atomic
    from due_ext.experiments.datalists import write_subset
    from due_ext.experiments.paths import portable_path

    cell_dir = out / "cells" / cell.cell_id
    cell_dir.mkdir(parents=True, exist_ok=True)
    datalist = Path(write_subset(base, out / "datalists", cell.train_size, cell.seed))
    # paths relative to OUT (the cell folder is where spec.json lies) or portable: see the module docstring
    spec = {"experiment": experiment.name, "cell": cell.cell_id, **cell.as_dict(),
            "datalist": datalist.relative_to(out).as_posix(), "data_root": data_root,
            "bundle_dir": portable_path(bundle_root(experiment.bundle)), "overrides": experiment.overrides,
            "extra_sections": experiment.extra_sections, "revision": revision}
    write_json_atomic(cell_dir / "spec.json", spec)
    # one process per cell, few threads: a crash loses one cell and the cores are shared with other work
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(cell_dir / "log.txt", "w") as log:
        try:
            done = subprocess.run([sys.executable, "-m", "due_ext.experiments.cell", str(cell_dir / "spec.json")],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode == 0
        except subprocess.TimeoutExpired:
            log.write(f"\ncell stopped after the {timeout} s timeout\n")
            done = False
    return cell, done and (cell_dir / RESULT_FILE).is_file(), time.perf_counter() - start


def run_experiment(config: str | Path, out: str | Path, workers: int = 1, threads: int = 1,
                   timeout: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every unfinished cell of the experiment ``config`` into ``out``; returns a summary
    (``finished``, ``skipped``, ``failed`` cell ids and ``wall_time_s``).

    Args:
        config: experiment file (YAML or JSON, see :mod:`due_ext.experiments.config`).
        out: output folder (created; reused to resume).
        workers: cells run at the same time (each its own process).
        threads: torch/OpenMP threads per cell process.
        timeout: seconds after which a cell is stopped and counted as failed (None: no limit).
        progress: show a progress bar on stderr.
    """
    from tqdm import tqdm

    from due_ext.data.datalist import write_json_atomic

    experiment = load_experiment(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = experiment.cells()
    pending = [c for c in cells if not (out / "cells" / c.cell_id / RESULT_FILE).is_file()]
    summary: dict[str, Any] = {"planned": len(cells), "skipped": [c.cell_id for c in cells if c not in pending],
                               "finished": [], "failed": []}
    start = time.perf_counter()
    if pending:
        from due_ext.experiments.datalists import subset_root
        from due_ext.experiments.paths import portable_path

        base = base_for(experiment)
        root = subset_root(base)
        revision = code_revision()
        recorded = experiment.as_dict()
        recorded["path"] = portable_path(experiment.path)
        if experiment.datalist is not None:
            recorded["datalist"] = portable_path(experiment.datalist)
        write_json_atomic(out / EXPERIMENT_FILE, {
            "experiment": recorded, "data_root": portable_path(root),
            "base_datalist": portable_path(base),
            "cells": [c.cell_id for c in cells], "revision": revision, "command": _command()})
        bar = tqdm(total=len(cells), initial=len(cells) - len(pending), desc=experiment.name, unit="cell",
                   disable=not progress, file=sys.stderr)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            jobs = [pool.submit(_run_one, experiment, c, out, base, portable_path(root), revision, threads, timeout)
                    for c in pending]
            for job in jobs:
                cell, done, seconds = job.result()
                summary["finished" if done else "failed"].append(cell.cell_id)
                _write_results(out)
                bar.set_postfix_str(f"{cell.cell_id} {'ok' if done else 'FAILED'} {seconds:.0f}s")
                bar.update(1)
        bar.close()
    _write_results(out)
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)
    return summary


def _command() -> str:
    """The command line of this launch, as a user would type it; absolute paths in portable form."""
    import shlex

    from due_ext.experiments.paths import portable_path

    argv = list(sys.argv)
    if argv and argv[0].endswith(("due_ext/__main__.py", "due-ext")):
        argv = ["python", "-m", "due_ext", *argv[1:]]
    elif argv:
        argv[0] = Path(argv[0]).name  # the program, not where this machine installed it
    return shlex.join(portable_path(a) if Path(a).is_absolute() else a for a in argv)


def base_for(experiment: Experiment) -> str:
    """The experiment's base datalist, prepared for all its methods (built/derived on first use)."""
    from due_ext.experiments.datalists import base_datalist

    methods = list(dict.fromkeys(m for g in experiment.grid for m in g["method"]))
    return base_datalist(experiment.dataset, experiment.datalist, methods, experiment.weight_normalization)
