"""Derivation in work units (due_ext.data.shards): receipts, reuse after a kill, corrupted files rebuilt, and a
two-process (gloo) derivation with the shipped models that derives each item once and writes the same files as
one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from due_ext.data.shards import Shard, derive_in_units, read_receipt, unit_ranges

REPO = Path(__file__).resolve().parents[1]


def test_unit_ranges_cover_items_in_fixed_units():
    assert unit_ranges(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert unit_ranges(0, 3) == []
    with pytest.raises(ValueError, match="unit_size"):
        unit_ranges(3, 0)


def test_shard_validates_rank():
    with pytest.raises(ValueError, match="rank"):
        Shard(rank=2, world=2)


def _text_deriver(folder: Path, calls: list[int]):
    def derive_unit(unit: range) -> list[dict[str, str]]:
        calls.extend(unit)
        entries = []
        for i in unit:
            path = folder / f"item{i}.txt"
            path.write_text(f"value {i}")
            entries.append({"value": str(path)})
        return entries

    return derive_unit


def test_units_are_reused_and_corrupted_ones_derived_again(tmp_path):
    names = [f"case{i}" for i in range(5)]
    calls: list[int] = []
    derive = _text_deriver(tmp_path, calls)
    entries = derive_in_units(names, derive, tmp_path / "units", unit_size=2)
    assert calls == [0, 1, 2, 3, 4]
    assert [Path(e["value"]).read_text() for e in entries] == [f"value {i}" for i in range(5)]

    calls.clear()  # a rerun (after a kill, say) derives nothing again
    assert derive_in_units(names, derive, tmp_path / "units", unit_size=2) == entries and calls == []

    (tmp_path / "item3.txt").write_text("truncat")  # a corrupted file: only its unit is derived again
    assert derive_in_units(names, derive, tmp_path / "units", unit_size=2) == entries and calls == [2, 3]

    calls.clear()
    (tmp_path / "units" / "unit-000004-000005.json").write_text("{not json")  # a corrupted receipt
    assert derive_in_units(names, derive, tmp_path / "units", unit_size=2) == entries and calls == [4]

    calls.clear()  # receipts of another item list are never taken for this one
    assert read_receipt(tmp_path / "units", range(0, 2), ["other", "case1"]) is None
    derive_in_units(["other", *names[1:]], derive, tmp_path / "units", unit_size=2)
    assert calls == [0, 1]


def test_a_process_derives_only_its_units(tmp_path, monkeypatch):
    import due_ext.data.shards as shards

    monkeypatch.setattr(shards, "barrier", lambda shard: None)  # no process group here: pretend rank 0 is done
    calls: list[int] = []
    # rank 1 of 2 derives units 1 and 3 of [0, 2), [2, 4), [4, 6), [6, 7) and leaves the assembly to rank 0
    assert derive_in_units([f"c{i}" for i in range(7)], _text_deriver(tmp_path, calls), tmp_path / "units",
                           Shard(rank=1, world=2), unit_size=2) is None
    assert calls == [2, 3, 6]


def test_derive_unit_must_return_one_entry_per_item(tmp_path):
    with pytest.raises(RuntimeError, match="1 entries for the 2 items"):
        derive_in_units(["a", "b"], lambda unit: [{}], tmp_path, unit_size=2)


def _read_volumes(datalist: Path) -> dict[str, dict[str, np.ndarray]]:
    from due_ext.data.nifti import read_nifti

    payload = json.loads(datalist.read_text())
    return {item["annotation"].rsplit("/", 1)[-1]: {key: read_nifti(item[key])[0]
                                                    for key in ("interpolation", "variance", "weights")}
            for section in ("training", "validation") for item in payload[section] if "weights" in item}


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # the torchrun processes use one thread too: same kernels, same bits
def test_two_processes_derive_each_item_once_and_write_what_one_process_writes(tmp_path):
    """The DUE bundle's derivation (shipped interpolator and uncertainty models, through their inference configs)
    under torchrun with two gloo processes, against one process on a copy of the same dataset."""
    from due_ext.bundles import derive_uncertainty_keys
    from due_ext.data.builders import build_dataset

    build_dataset("phantom", tmp_path / "one", n_pos=20, n_neg=3, seed=0)
    shutil.copytree(tmp_path / "one", tmp_path / "two")  # same dataset, another folder (derived files go beside it)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(REPO / "tests" / "derivation_worker.py"), str(tmp_path / "two" / "datalist.json"),
                          str(tmp_path / "rank")], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["datalist"] == reports[1]["datalist"]

    payload = json.loads(Path(reports[0]["datalist"]).read_text())
    n_items = sum("annotation" in item for section in ("training", "validation") for item in payload[section])
    for step in ("interpolator", "uncertainty"):
        per_rank = [report["items_derived"][step] for report in reports]
        assert sum(per_rank) == n_items and min(per_rank) > 0  # each item once, both processes worked

    one = derive_uncertainty_keys(str(tmp_path / "one" / "datalist.json"))
    assert Path(one).parents[2] == tmp_path / "one" and Path(reports[0]["datalist"]).parents[2] == tmp_path / "two"
    single, shared = _read_volumes(Path(one)), _read_volumes(Path(reports[0]["datalist"]))
    assert single.keys() == shared.keys() and len(single) == n_items
    for name, volumes in single.items():
        for key, volume in volumes.items():
            assert np.array_equal(volume, shared[name][key]), f"{name} {key} differs between 1 and 2 processes"


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_two_process_due_bundle_run_derives_each_item_once(tmp_path):
    """The DUE bundle itself under torchrun (train.json + multi_gpu_train.json, --method due, gloo): each derived
    item comes from exactly one process, both processes worked, and the files equal a one-process derivation of
    a copy of the same dataset."""
    from due_ext.bundles import derive_uncertainty_keys

    root, cache = tmp_path / "bundle", tmp_path / "cache"
    root.mkdir()
    configs = json.dumps([str(REPO / "bundles" / "due" / "train.json"),
                          str(REPO / "bundles" / "due" / "multi_gpu_train.json")])
    env = dict(os.environ, DUE_EXT_CACHE=str(cache), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle",
                          "run", "--config_file", configs, "--bundle_root", str(root), "--demo_dataset", "phantom",
                          "--method", "due", "--max_epochs", "1", "--block_inplanes", "[4, 8, 8, 8]"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (dataset,) = (cache / "datasets").glob("phantom-*")
    (derived,) = dataset.glob("derived-*")
    for step in ("interpolator", "uncertainty"):
        receipts = [json.loads(p.read_text()) for p in sorted((derived / step / "units").glob("unit-*.json"))]
        names = [name for receipt in receipts for name in receipt["names"]]
        assert names and len(names) == len(set(names))  # every item in one unit, derived once
        assert {receipt["derived_by"]["rank"] for receipt in receipts} == {0, 1}

    single = tmp_path / "single"
    shutil.copytree(dataset, single, ignore=shutil.ignore_patterns("derived-*"))
    one = _read_volumes(Path(derive_uncertainty_keys(str(single / "datalist.json"))))
    shared = _read_volumes(derived / "uncertainty" / "datalist.json")
    assert one.keys() == shared.keys() and one
    for name, volumes in one.items():
        for key, volume in volumes.items():
            assert np.array_equal(volume, shared[name][key]), f"{name} {key} differs between 1 and 2 processes"
