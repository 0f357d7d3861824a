"""Interpolator evaluation: Dice, sparsification, per-k / per-method results, folder and datalist inputs, axes,
and the ``python -m due_ext interp evaluate`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from due_ext.cli import main
from due_ext.data.datalist import write_datalist
from due_ext.data.nifti import write_nifti
from due_ext.interp.diffusion.model import SliceInterpolationUNet
from due_ext.interp.diffusion.sampling import SamplerSettings
from due_ext.interp.evaluate import (
    evaluate_interpolators,
    load_masks_for_evaluation,
    markdown_table,
    parse_every_k,
)
from due_ext.metrics.segmentation import dice

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dice_values():
    a = np.zeros((4, 4), np.uint8)
    b = np.zeros((4, 4), np.uint8)
    assert dice(a, b) == 1.0 and dice(a, b, empty=0.0) == 0.0
    a[0, :2] = 1
    b[0, 1:3] = 1
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a * 0.5, b) == 0.0  # exactly 0.5 is background
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:2])


def cylinder(shape=(12, 14, 10), z_range=(2, 8)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[3:8, 4:10, z_range[0]:z_range[1] + 1] = 1
    return mask


def cone(shape=(20, 20, 12)) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(float)
    radius = 1.0 + 0.8 * (grid[..., 2] - 1)
    inside = np.hypot(grid[..., 0] - 9.5, grid[..., 1] - 9.5) <= radius
    inside[..., :1] = False
    inside[..., 11:] = False
    return inside.astype(np.uint8)


def test_classical_exact_on_a_prism_and_counts():
    results = evaluate_interpolators([("prism", cylinder())], every_k=[2, 3, 4], methods=["nearest", "linear", "sdf"])
    for k in ("2", "3", "4"):
        for method in ("nearest", "linear", "sdf"):
            r = results["per_k"][k][method]
            assert r["dice_missing_mean"] == pytest.approx(1.0) and r["dice_whole_mean"] == pytest.approx(1.0)
    # slices 2..8: k=2 keeps 2,4,6,8 (3 missing); k=3 keeps 2,5,8 (4 missing); k=4 keeps 2,6,8 (4 missing)
    assert [results["per_k"][k]["sdf"]["per_mask"][0]["missing_slices"] for k in ("2", "3", "4")] == [3, 4, 4]
    table = markdown_table(results)
    assert table.count("\n| ") == 3 and "k=4: missing (whole)" in table


def test_methods_rank_on_a_cone_and_axis_is_honoured():
    mask = cone()
    results = evaluate_interpolators([("cone", mask)], every_k=[3], methods=["nearest", "sdf"])
    sdf = results["per_k"]["3"]["sdf"]["dice_missing_mean"]
    nearest = results["per_k"]["3"]["nearest"]["dice_missing_mean"]
    assert 0.8 < sdf <= 1.0 and nearest < sdf  # a growing cross-section: shape-based beats copying
    assert results["per_k"]["3"]["sdf"]["dice_whole_mean"] > sdf  # kept slices are exact
    moved = evaluate_interpolators([("cone", np.moveaxis(mask, 2, 0))], every_k=[3], methods=["nearest", "sdf"],
                                   axis=0)
    assert moved["per_k"]["3"]["sdf"]["dice_missing_mean"] == pytest.approx(sdf)


def test_mask_without_missing_slices_counts_for_whole_only():
    thin = cylinder(z_range=(4, 5))  # two slices: both kept at every k
    results = evaluate_interpolators([("thin", thin), ("prism", cylinder())], every_k=[2], methods=["linear"])
    r = results["per_k"]["2"]["linear"]
    assert r["n_with_missing"] == 1 and len(r["per_mask"]) == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        evaluate_interpolators([("c", cylinder())], methods=["bicubic"])
    with pytest.raises(ValueError, match="needs a model"):
        evaluate_interpolators([("c", cylinder())], methods=["diffusion"])
    with pytest.raises(ValueError, match=">= 2"):
        evaluate_interpolators([("c", cylinder())], every_k=[1], methods=["sdf"])
    assert parse_every_k("2,3,4") == [2, 3, 4] and parse_every_k((2, 3)) == [2, 3] and parse_every_k(4) == [4]


def test_load_masks_from_folder_and_datalist(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", cylinder())
    write_nifti(tmp_path / "b.nii", cone())
    write_nifti(tmp_path / "empty.nii.gz", np.zeros((4, 4, 4), np.uint8))  # skipped: nothing to interpolate
    (tmp_path / "notes.txt").write_text("not a mask")
    pairs = load_masks_for_evaluation(tmp_path)
    assert [name for name, _ in pairs] == ["a", "b"]
    datalist = write_datalist(tmp_path / "list.json", {"test": [{"image": "a.nii.gz", "label": 1, "mask": "a.nii.gz"},
                                                                  {"image": "b.nii", "label": 0}]})
    assert [name for name, _ in load_masks_for_evaluation(datalist)] == ["a"]
    with pytest.raises(ValueError, match="no non-empty 3D mask"):
        load_masks_for_evaluation(datalist, sections=["training"])
    with pytest.raises(FileNotFoundError, match="neither"):
        load_masks_for_evaluation(tmp_path / "missing")
    write_nifti(tmp_path / "flat" / "f.nii.gz", np.ones((4, 4), np.uint8))
    with pytest.raises(ValueError, match="must be 3D"):
        load_masks_for_evaluation(tmp_path / "flat")


def test_diffusion_method_runs_batched_on_any_size():
    torch.manual_seed(0)
    model = SliceInterpolationUNet(channels=(8, 16), norm_num_groups=4, num_head_channels=8, crop_size=8).eval()
    big = np.zeros((40, 30, 9), np.uint8)
    big[5:35, 4:26, 1:8] = 1  # wider than the crop: resampled inside
    results = evaluate_interpolators([("big", big), ("prism", cylinder())], every_k=[3], methods=["diffusion", "sdf"],
                                     model=model, settings=SamplerSettings(steps=1, repeats=2, bf16=False))
    r = results["per_k"]["3"]["diffusion"]
    assert len(r["per_mask"]) == 2 and 0.0 <= r["dice_missing_mean"] <= 1.0


def test_cli_evaluate(tmp_path, capsys):
    masks = tmp_path / "masks"
    write_nifti(masks / "a.nii.gz", cylinder())
    write_nifti(masks / "b.nii.gz", cone())
    out = tmp_path / "results.json"
    main(["interp", "evaluate", "--masks", str(masks), "--every-k", "2,3", "--methods", "sdf,nearest",
          "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["every_k"] == [2, 3] and set(results["per_k"]["2"]) == {"sdf", "nearest"}
    assert out.with_suffix(".md").read_text().startswith("| method |")
    assert "| sdf |" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")  # ITK's SWIG
def test_all_methods_include_the_new_peers_and_skip_morphological_without_itk(monkeypatch):
    import sys

    from due_ext.interp.evaluate import METHODS, resolve_methods

    assert resolve_methods("all") == (list(METHODS), {})  # the itk extra is part of the test extra
    assert {"linear_union", "morphological"} <= set(METHODS)
    results = evaluate_interpolators([("prism", cylinder())], every_k=[2, 4], methods=["linear_union", "morphological"])
    for k in ("2", "4"):  # a prism: every classical peer is exact
        for method in ("linear_union", "morphological"):
            assert results["per_k"][k][method]["dice_missing_mean"] == pytest.approx(1.0)
    monkeypatch.setitem(sys.modules, "itk", None)  # as if the itk extra were not installed
    with pytest.warns(UserWarning, match=r"due-ext\[itk\]"):
        methods, skipped = resolve_methods("all")
    assert methods == [m for m in METHODS if m != "morphological"] and set(skipped) == {"morphological"}
    assert resolve_methods("sdf,morphological") == (["sdf", "morphological"], {})  # explicit: kept, fails below
    with pytest.raises(ModuleNotFoundError, match=r"due-ext\[itk\]"):
        evaluate_interpolators([("c", cylinder())], methods=["sdf", "morphological"])
    results = evaluate_interpolators([("c", cylinder())], every_k=[2], methods=["sdf"])
    results["skipped"] = skipped
    assert "Not run: morphological (method 'morphological' needs" in markdown_table(results)
