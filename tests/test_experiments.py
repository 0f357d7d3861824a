"""Experiment runner: a tiny grid (2 methods x 2 seeds, 1 epoch, narrow network, the tiny fixture dataset) through
the real runner (one subprocess per cell), resume, the table's numbers, config errors and the figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from due_ext.experiments import ExperimentConfigError, load_experiment, markdown_table, read_rows, run_experiment
from due_ext.experiments.datalists import training_subset, write_subset
from due_ext.experiments.figures import plot_sweep, write_figures
from due_ext.experiments.table import COLUMNS, experiment_table, mean_std, row_metric, table_columns

REPO = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = {"max_epochs": 1, "block_inplanes": [4, 8, 8, 8], "batch_size": 4}


def _config(folder: Path, datalist: Path, **changes) -> Path:
    config = {"name": "tiny", "datalist": str(datalist),
              "grid": {"method": ["baseline", "due"], "seed": [0, 1], "train_size": [4]},
              "overrides": TINY_OVERRIDES, **changes}
    path = folder / "tiny.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The tiny grid, run once for the module; returns (output folder, config, first summary). The data lies in
    the cache folder (``$DUE_EXT_CACHE``), as a demo dataset does, so every path written is portable."""
    from tests.conftest import build_tiny_dataset

    tmp = tmp_path_factory.mktemp("experiment")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DUE_EXT_CACHE", str(tmp / "cache"))
        datalist = build_tiny_dataset(tmp / "cache" / "data")
        config = _config(tmp / "cache", datalist)  # a committed config lies in the checkout: portable too
        out = tmp / "out"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        summary = run_experiment(config, out, workers=2, threads=1, progress=False)
        yield out, config, summary


def test_grid_runs_every_cell_with_one_row_each(grid):
    out, _, summary = grid
    assert summary["failed"] == [], [(out / "cells" / c / "log.txt").read_text()[-2000:] for c in summary["failed"]]
    assert len(summary["finished"]) == 4
    rows = read_rows(out)
    assert sorted(r["cell"] for r in rows) == sorted(summary["finished"])
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4
    for row in rows:
        assert row["config"]["max_epochs"] == 1 and row["config"]["method"] == row["method"]
        assert row["lam"] == row["config"]["lam"]  # the bundle's default lambda, resolved
        assert "commit" in row["revision"] and row["wall_time_s"]["total"] > 0
        assert {"roc_auc", "pr_auc"} <= set(row["metrics"]["prediction"])
        assert "iou" in row["metrics"]["explanation"]
        subset = json.loads((out / row["datalist"]).read_text())
        assert len(subset["training"]) == 4 and subset["subset"]["seed"] == row["seed"]
    recorded = json.loads((out / "experiment.json").read_text())
    assert len(recorded["cells"]) == 4 and recorded["experiment"]["name"] == "tiny"


def _strings(value):
    """Every string inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_written_rows_specs_and_datalists_hold_no_absolute_path(grid):
    """What gets committed (experiment.json, specs, rows, results.jsonl, subsets) names no folder of this
    machine; the paths still lead to the data: subset volumes below the recorded root, the root in the cache."""
    from due_ext.experiments.paths import resolve_portable

    out, _, _ = grid
    files = [out / "experiment.json", out / "results.jsonl", *out.glob("cells/*/spec.json"),
             *out.glob("cells/*/result.json"), *out.glob("datalists/*.json")]
    assert len(files) == 2 + 4 + 4 + 2
    machine = str(out.parent)
    for path in files:
        text = path.read_text()
        assert machine not in text, path
        for line in text.splitlines() if path.suffix == ".jsonl" else [text]:
            absolute = [v for v in _strings(json.loads(line)) if os.path.isabs(v)]
            assert absolute == [], (path, absolute)
    recorded = json.loads((out / "experiment.json").read_text())
    assert recorded["data_root"] == "<cache>/data" and recorded["base_datalist"] == "<cache>/data/datalist.json"
    assert recorded["experiment"]["datalist"] == "<cache>/data/datalist.json"
    assert recorded["experiment"]["path"] == "<cache>/tiny.json"
    for path in out.glob("datalists/*.json"):
        subset = json.loads(path.read_text())
        root = resolve_portable(subset["subset"]["root"])
        assert root == out.parent / "cache" / "data" and subset["subset"]["base"] == "datalist.json"
        volumes = [item[key] for item in subset["training"] + subset["test"] for key in ("image", "mask", "weights")
                   if key in item]
        assert len(volumes) > len(subset["training"]) + len(subset["test"])  # more than the images alone
        assert all((root / volume).is_file() for volume in volumes)


def test_resume_skips_finished_cells_and_reruns_a_crashed_one(grid):
    out, config, _ = grid
    again = run_experiment(config, out, progress=False)
    assert again["finished"] == [] and len(again["skipped"]) == 4
    crashed = "due-n4-lamdefault-s1"
    before = {r["cell"]: r["finished_at"] for r in read_rows(out)}
    (out / "cells" / crashed / "result.json").unlink()  # what a killed cell leaves: no row
    (out / "cells" / crashed / "run" / "partial.txt").write_text("left by the crash")
    resumed = run_experiment(config, out, progress=False)
    assert resumed["finished"] == [crashed] and len(resumed["skipped"]) == 3
    assert not (out / "cells" / crashed / "run" / "partial.txt").exists()  # re-run from scratch
    after = {r["cell"]: r["finished_at"] for r in read_rows(out)}
    assert all(after[c] == before[c] for c in before if c != crashed)


def test_table_numbers_are_mean_and_std_of_the_rows(grid):
    out, _, _ = grid
    rows = read_rows(out)
    table = experiment_table(out)
    for method, name in (("baseline", "Baseline"), ("due", "DUE")):
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == "2"
        for (column, group, key), text in zip(table_columns(rows), cells[2:], strict=True):
            values = [row_metric(r, group, key) for r in rows if r["method"] == method]
            mean, std = mean_std(values)
            expected = "n/a" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}"
            assert text == expected, column


def test_table_aggregates_synthetic_rows_exactly():
    rows = [{"method": "due", "seed": s, "train_size": 20, "lam": 1.0,
             "metrics": {"prediction": {"roc_auc": v, "pr_auc": v / 2},
                         "explanation": {k: {"mean": v / 4} for k in ("iou", "precision", "recall", "f1")}}}
            for s, v in enumerate([0.6, 0.8, 1.0])]
    table = markdown_table(rows, planned={("due", 20, 1.0): 5, ("baseline", 20, 1.0): 5})
    due = next(line for line in table.splitlines() if line.startswith("| DUE"))
    std = np.std([0.6, 0.8, 1.0], ddof=1)
    assert f"80.00 ± {100 * std:.2f}" in due and f"40.00 ± {50 * std:.2f}" in due
    assert "3 of 5 (incomplete)" in due
    assert "Baseline (not run yet" in table


def test_table_adds_localisation_columns_and_one_row_per_floor():
    def row(method, seed, v):
        explanation = {k: {"mean": v / 4} for k in ("iou", "precision", "recall", "f1")}
        explanation["pointing_game"] = {"mean": v / 2}
        floors = {"gaussian_blob": {"iou": {"mean": 0.1}, "pointing_game": {"mean": 0.2}, "lesion_voxels": 40.0},
                  "initial_cam": {"mask_auroc": {"mean": 0.06 + 0.02 * seed}}}
        return {"method": method, "seed": seed, "train_size": 20, "lam": 1.0,
                "metrics": {"prediction": {"roc_auc": v, "pr_auc": v}, "explanation": explanation, "floors": floors}}

    rows = [row("due", s, v) for s, v in enumerate([0.6, 0.8, 1.0])] + [row("baseline", s, 0.5) for s in range(3)]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == ("| Method | seeds | " + " | ".join(c[0] for c in COLUMNS)
                        + " | Pointing | Energy pointing | Mask AUROC | IoU best t |")
    due = next(line for line in lines if line.startswith("| DUE"))
    assert f"| 40.00 ± {50 * np.std([0.6, 0.8, 1.0], ddof=1):.2f} | n/a | n/a | n/a |" in due
    # floors: one value per seed (the baseline rows repeat them), mean ± sample std over the 3 seeds
    blob = next(line for line in lines if line.startswith("| floor: centred Gaussian blob"))
    assert blob == ("| floor: centred Gaussian blob | 3 | n/a | n/a | 10.00 ± 0.00 | n/a | n/a | n/a "
                    "| 20.00 ± 0.00 | n/a | n/a | n/a |")
    initial = next(line for line in lines if line.startswith("| floor: Grad-CAM at initialisation"))
    assert initial.endswith("| n/a | n/a | 8.00 ± 2.00 | n/a |")
    # rows without localisation scores (older runs) keep the six paper columns and no floor rows
    old = markdown_table([{"method": "due", "seed": 0, "train_size": 20, "lam": 1.0,
                           "metrics": {"prediction": {"roc_auc": 0.5}, "explanation": {}}}])
    assert "Pointing" not in old and "floor" not in old


def test_table_of_an_extra_section_uses_its_metrics_and_skips_failed_runs():
    from due_ext.experiments.table import section_rows

    def row(seed, iou, extra):
        return {"method": "due", "seed": seed, "train_size": 20, "lam": 1.0,
                "metrics": {"prediction": {"roc_auc": 0.9}, "explanation": {"iou": {"mean": 0.0}}},
                "extra_sections": extra and {"real_tumours": extra}}

    rows = [row(0, 0.0, {"prediction": {}, "explanation": {"iou": {"mean": 0.2}}}),
            row(1, 0.0, {"prediction": {}, "explanation": {"iou": {"mean": 0.4}}}),
            row(2, 0.0, {"error": "RuntimeError: boom"}), row(3, 0.0, {})]
    assert section_rows(rows, "test") is rows
    tumours = section_rows(rows, "real_tumours")
    assert [r["seed"] for r in tumours] == [0, 1]
    line = next(x for x in markdown_table(tumours).splitlines() if x.startswith("| DUE"))
    assert f"| 30.00 ± {100 * np.std([0.2, 0.4], ddof=1):.2f} |" in line


def test_training_subset_is_balanced_seeded_and_nested():
    items = [{"image": f"{i}.nii.gz", "label": i % 2} for i in range(40)]
    small, large = training_subset(items, 6, seed=3), training_subset(items, 12, seed=3)
    assert sum(i["label"] for i in small) == 3 and len(small) == 6
    assert {i["image"] for i in small} <= {i["image"] for i in large}
    assert small == training_subset(items, 6, seed=3) and small != training_subset(items, 6, seed=4)
    with pytest.raises(ValueError, match="needs 25 items with label 1"):
        training_subset(items, 50, seed=0)


def test_subset_is_cut_again_when_its_base_changes(tmp_path):
    """A subset written from one base (e.g. DUE keys derived by older upstream models) must not be reused for
    another base: the cells would silently train on stale derived volumes."""
    items = [{"image": f"{i}.nii.gz", "label": i % 2} for i in range(8)]
    old, new = tmp_path / "old" / "datalist.json", tmp_path / "new" / "datalist.json"
    for base, tag in ((old, "old"), (new, "new")):
        base.parent.mkdir()
        base.write_text(json.dumps({"training": [dict(it, interpolation=f"{tag}/{i}.nii.gz")
                                                 for i, it in enumerate(items)], "test": []}))
    first = write_subset(str(old), tmp_path / "subsets", 4, seed=0)
    assert write_subset(str(old), tmp_path / "subsets", 4, seed=0) == first  # same base: reused
    payload = json.loads(Path(write_subset(str(new), tmp_path / "subsets", 4, seed=0)).read_text())
    # the data root is the base's folder (its volumes lie below it); volumes and base are relative to it
    assert payload["subset"]["base"] == "datalist.json"
    assert payload["subset"]["root"] == str(new.parent.resolve())  # outside cache and checkout: stays absolute
    assert all(it["interpolation"].startswith("new/") for it in payload["training"])


@pytest.mark.parametrize(("text", "key"), [
    ('{"grid": {"method": ["due", "nonsense"]}}', "grid.method"),
    ('{"grid": {"method": ["due"], "seed": [0, -1]}}', "grid.seed"),
    ('{"grid": {"method": ["due"], "train_size": [21]}}', "grid.train_size"),
    ('{"grid": {"method": ["due"], "lam": ["big"]}}', "grid.lam"),
    ('{"grid": {"method": ["due"], "epochs": [3]}}', "grid.epochs"),
    ('{"grid": {"method": ["due"]}, "overrides": {"seed": 3}}', "overrides.seed"),
    ('{"grid": {"method": ["due"]}, "dataset": {"nmae": "lung-ct"}}', "dataset.nmae"),
    ('{"grid": {"method": ["due"]}, "extra": 1}', "extra"),
    ('{"grid": {"method": ["due"]}, "weight_normalization": "global"}', "weight_normalization"),
    ('{"name": "x"}', "grid"),
])
def test_bad_config_errors_name_the_file_and_the_key(tmp_path, text, key):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ExperimentConfigError) as err:
        load_experiment(path)
    assert str(path) in str(err.value) and f"'{key}'" in str(err.value)


def test_yaml_config_and_cli_error_exit(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("grid:\n  - {method: [due], lam: [0.1, 1]}\n  - {method: [baseline]}\n")
    assert [c.cell_id for c in load_experiment(good).cells()] == [
        "due-nall-lam0.1-s0", "due-nall-lam1-s0", "baseline-nall-lamdefault-s0"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  method: [due]\n  seed: [zero]\n")
    run = subprocess.run([sys.executable, "-m", "due_ext", "experiment", "run", "--config", str(bad),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and str(bad) in run.stderr and "'grid.seed'" in run.stderr


def test_figures_are_written(grid, tmp_path):
    out, _, _ = grid
    written = {p.name for p in write_figures(out, tmp_path / "figures")}
    assert {"fig4_gradcam.png", "fig5_threshold.png"} <= written
    assert all((tmp_path / "figures" / name).stat().st_size > 1000 for name in written)
    rows = [{"method": m, "seed": s, "train_size": n, "lam": lam, "cell": "x",
             "metrics": {"prediction": {"accuracy": 0.5, "roc_auc": 0.6},
                         "explanation": {"iou": {"mean": 0.2}, "f1": {"mean": 0.3}}}}
            for m, lams in (("due", (0.01, 1.0)), ("baseline", (0.1,))) for lam in lams
            for n in (20, 50) for s in (0, 1)]
    assert plot_sweep(rows, "train_size", tmp_path / "fig3.png").is_file()
    assert plot_sweep(rows, "lam", tmp_path / "fig6.png", log_x=True).is_file()
    assert plot_sweep([r for r in rows if r["train_size"] == 20 and r["lam"] == 1.0], "train_size",
                      tmp_path / "none.png") is None
