"""Datalist validation: every kind of bad datalist is rejected through the API and the CLI, naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from due_ext.cli import main as cli_main
from due_ext.data import schema, validate
from due_ext.data.nifti import read_nifti, write_nifti
from due_ext.data.validate import DatalistError, assert_valid_item, check_datalist, validate_item

REPO = Path(__file__).resolve().parents[1]


def _run_cli(path: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run ``due_ext data check PATH`` in-process; returns (exit status, stdout, stderr)."""
    try:
        cli_main(["data", "check", str(path)])
        status = 0
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def _rewrite(folder: Path, item: dict, key: str, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Overwrite the file of ``item[key]`` with ``array`` (image's affine unless given)."""
    if affine is None:
        affine = read_nifti(folder / item["image"])[1]
    write_nifti(folder / item[key], array, affine)


def _volume(folder: Path, item: dict, key: str) -> np.ndarray:
    return read_nifti(folder / item[key])[0]


# Each case: id -> (edit(datalist, folder), substrings the single problem message must contain).
# training[0] and training[1] are positives with every key; training[2] and training[3] are negatives.
def _delete_file(key: str):
    def edit(d, folder):
        (folder / d["training"][0][key]).unlink()
    return edit


def _wrong_shape(key: str):
    def edit(d, folder):
        item = d["training"][0]
        _rewrite(folder, item, key, _volume(folder, item, key)[..., :7])
    return edit


def _truncate(d, folder):
    path = folder / d["training"][1]["image"]
    path.write_bytes(path.read_bytes()[:200])


def _set(section: int, key: str, value):
    def edit(d, folder):
        d["training"][section][key] = value
    return edit


def _drop(section: int, key: str):
    def edit(d, folder):
        del d["training"][section][key]
    return edit


def _values(key: str, index: tuple, value: float, dtype=np.float32):
    def edit(d, folder):
        item = d["training"][0]
        array = _volume(folder, item, key).astype(dtype)
        array[index] = value
        _rewrite(folder, item, key, array)
    return edit


def _shift_affine(d, folder):
    item = d["training"][0]
    array, affine = read_nifti(folder / item["weights"])
    affine = affine.copy()
    affine[0, 3] += 0.01
    _rewrite(folder, item, "weights", array, affine)


def _reshape_image(shape: tuple):
    def edit(d, folder):
        item = d["training"][2]  # a negative: image only
        _rewrite(folder, item, "image", np.zeros(shape, np.float32))
    return edit


def _first_slices(d, folder):
    return d["training"][0]["annotated_slices"]


CASES = {
    "not-json": (lambda d, f: "{not json", ["not valid JSON"]),
    "not-object": (lambda d, f: "[1, 2]", ["must be a JSON object"]),
    "section-not-list": (lambda d, f: d.update(training={"image": "x"}), ["section 'training' is a dict"]),
    "item-not-object": (lambda d, f: d["training"].__setitem__(0, "case.nii.gz"),
                        ["training[0] (no image)", "item is a str"]),
    "image-key-missing": (_drop(2, "image"), ["training[2] (no image)", "image key missing"]),
    **{f"file-missing-{key}": (_delete_file(key), ["training[0] (case_000_image.nii.gz)",
                                                   f"case_000_{key}.nii.gz: file not found"])
       for key in schema.VOLUME_KEYS},
    "corrupt-nifti": (_truncate, ["training[1] (case_001_image.nii.gz)", "case_001_image.nii.gz",
                                  "not a readable NIfTI"]),
    **{f"shape-{key}": (_wrong_shape(key), [f"{key}", f"case_000_{key}.nii.gz",
                                            "shape (16, 16, 7) != image shape (16, 16, 8)"])
       for key in schema.GRID_KEYS},
    "affine": (_shift_affine, ["case_000_weights.nii.gz", "affine differs"]),
    "label-missing": (_drop(2, "label"), ["training[2]", "label missing"]),
    "label-2": (_set(2, "label", 2), ["label 2 is not 0 or 1"]),
    "label-string": (_set(2, "label", "1"), ["label '1' is not 0 or 1"]),
    "label-bool": (_set(2, "label", True), ["label True is not 0 or 1"]),
    "label-half": (_set(2, "label", 0.5), ["label 0.5 is not 0 or 1"]),
    "positive-no-annotation": (_drop(1, "annotation"), ["training[1]", "positive (label 1) without annotation"]),
    "positive-no-slices": (_drop(1, "annotated_slices"), ["positive (label 1) without annotated_slices"]),
    "slices-not-list": (_set(0, "annotated_slices", "2,4"), ["annotated_slices '2,4' is not a list of ints"]),
    "slices-float": (_set(0, "annotated_slices", [2.0, 4.0]), ["is not a list of ints"]),
    "slices-bool": (_set(0, "annotated_slices", [True]), ["is not a list of ints"]),
    "slices-empty": (_set(0, "annotated_slices", []), ["positive (label 1) with empty annotated_slices"]),
    "slices-duplicates": (lambda d, f: d["training"][0].update(annotated_slices=[2, 2, 4]),
                          ["annotated_slices has duplicates [2]"]),
    "slices-unsorted": (lambda d, f: d["training"][0].update(annotated_slices=[4, 2]), ["is not sorted"]),
    "slices-out-of-range": (lambda d, f: d["training"][0].update(annotated_slices=[2, 8]),
                            ["annotated_slices [8] outside [0, 8)"]),
    "slices-negative": (lambda d, f: d["training"][0].update(annotated_slices=[-1, 2]),
                        ["annotated_slices [-1] outside [0, 8)"]),
    "slice-without-foreground": (lambda d, f: d["training"][0].update(annotated_slices=[0, 2]),
                                 ["case_000_annotation.nii.gz", "annotated slice(s) [0] hold no foreground"]),
    "annotation-not-binary": (_values("annotation", (8, 8, 2), 2.0),
                              ["case_000_annotation.nii.gz", "not binary (values 2 besides 0/1)"]),
    "mask-not-binary": (_values("mask", (0, 0, 0), 0.5), ["case_000_mask.nii.gz", "not binary (values 0.5"]),
    "image-nan": (_values("image", (1, 2, 3), np.nan), ["case_000_image.nii.gz", "1 NaN or Inf value(s)"]),
    "weights-inf": (_values("weights", (1, 2, 3), np.inf), ["case_000_weights.nii.gz", "NaN or Inf"]),
    "weights-above-1": (_values("weights", (1, 2, 3), 1.5), ["case_000_weights.nii.gz", "outside [0, 1]"]),
    "interpolation-negative": (_values("interpolation", (1, 2, 3), -0.1),
                               ["case_000_interpolation.nii.gz", "outside [0, 1]"]),
    "variance-negative": (_values("variance", (1, 2, 3), -1.0),
                          ["case_000_variance.nii.gz", "negative values (min -1)"]),
    "image-2d": (_reshape_image((16, 16)), ["case_002_image.nii.gz", "shape (16, 16) is not 3D (X, Y, Z)"]),
    "image-4d": (_reshape_image((16, 16, 8, 2)), ["shape (16, 16, 8, 2) is not 3D (X, Y, Z)"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_problem_is_reported_by_api_and_cli(case, broken_dataset, capsys):
    edit, expected = CASES[case]
    path = broken_dataset(edit)
    report = check_datalist(path)
    assert len(report.problems) == 1, report.problems
    for text in expected:
        assert text in report.problems[0], (text, report.problems[0])
    assert not report.valid

    status, out, err = _run_cli(path, capsys)
    assert status == 1
    assert report.problems[0] in err
    assert f"{path}: 1 problem(s) found" in err
    assert out == ""


def test_missing_datalist_is_reported(tmp_path, capsys):
    path = tmp_path / "nowhere" / "datalist.json"
    report = check_datalist(path)
    assert report.problems == [f"{path}: datalist not found"]
    status, _, err = _run_cli(path, capsys)
    assert status == 1 and f"{path}: datalist not found" in err


def test_valid_datalist_passes_with_summary(tiny_dataset, capsys):
    report = check_datalist(tiny_dataset)
    assert report.problems == [] and report.valid
    assert report.counts["training"] == Counter(items=4, positives=2, negatives=2)
    assert report.counts["validation"] == Counter(items=2, positives=1, negatives=1)
    assert report.shapes == Counter({(16, 16, 8): 8})
    summary = report.summary()
    assert "\n" not in summary
    for text in ("valid", "training 4 (2 pos, 2 neg)", "validation 2 (1 pos, 1 neg)", "test 2 (1 pos, 1 neg)",
                 "16x16x8", f"{report.annotated_slices} annotated slices on 4 positives"):
        assert text in summary
    assert report.annotated_slices >= 8  # 4 positives, at least 2 drawn slices each

    status, out, err = _run_cli(tiny_dataset, capsys)
    assert status == 0 and err == ""
    assert out.strip() == summary


def test_every_problem_of_every_item_is_reported(broken_dataset):
    def edit(d, folder):
        d["training"][0]["label"] = 3
        d["training"][0]["annotated_slices"] = [2, 9]
        (folder / d["training"][0]["weights"]).unlink()
        _wrong_shape("mask")(d, folder)
        d["validation"][1]["label"] = -1

    problems = check_datalist(broken_dataset(edit)).problems
    assert len(problems) == 5, problems
    assert [p.split(":")[0] for p in problems].count("training[0] (case_000_image.nii.gz)") == 4
    assert any(p.startswith("validation[1] (case_005_image.nii.gz): label -1") for p in problems)


def test_trailing_singleton_dimension_is_accepted_with_a_note(broken_dataset, capsys):
    path = broken_dataset(_reshape_image((16, 16, 8, 1)))
    report = check_datalist(path)
    assert report.problems == []
    assert len(report.notes) == 1 and "trailing singleton" in report.notes[0] and "case_002_image" in report.notes[0]
    assert "1 note(s)" in report.summary()
    status, out, err = _run_cli(path, capsys)
    assert status == 0 and f"note: {report.notes[0]}" in err and "valid" in out


def test_float_labels_and_empty_slices_of_negatives_are_accepted(broken_dataset):
    def edit(d, folder):
        d["training"][0]["label"] = 1.0
        d["training"][2]["label"] = 0.0
        d["training"][3]["annotated_slices"] = []  # a negative: nothing drawn is fine

    report = check_datalist(broken_dataset(edit))
    assert report.problems == []
    assert report.counts["training"]["positives"] == 2


def test_negative_with_annotation_files_is_still_checked(broken_dataset):
    def edit(d, folder):
        d["training"][0]["label"] = 0  # annotation files stay: they must still be readable and consistent
        _wrong_shape("weights")(d, folder)

    problems = check_datalist(broken_dataset(edit)).problems
    assert len(problems) == 1 and "weights" in problems[0]


def test_empty_datalist_is_a_problem(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text('{"training": [], "validation": [], "test": []}')
    assert check_datalist(path).problems == [f"{path}: no items in any section (training, validation, test)"]


def test_dataset_dir_resolves_relative_paths(tiny_dataset, tmp_path):
    moved = tmp_path / "elsewhere" / "list.json"
    moved.parent.mkdir()
    moved.write_text(tiny_dataset.read_text())
    assert check_datalist(moved).problems  # files are not next to the moved datalist
    assert check_datalist(moved, dataset_dir=tiny_dataset.parent).problems == []


def test_each_volume_is_read_once(tiny_dataset, monkeypatch):
    reads: Counter = Counter()
    real = validate.read_nifti

    def counting(path, **kwargs):
        reads[Path(path)] += 1
        return real(path, **kwargs)

    monkeypatch.setattr(validate, "read_nifti", counting)
    assert check_datalist(tiny_dataset).problems == []
    files = {p for p in tiny_dataset.parent.iterdir() if p.name.endswith(".nii.gz")}
    assert set(reads) == files
    assert set(reads.values()) == {1}


def test_validate_item_and_assert_valid_item(tiny_dataset):
    import json

    folder = tiny_dataset.parent
    item = json.loads(tiny_dataset.read_text())["training"][0]
    assert validate_item(item, folder) == []
    assert_valid_item(item, folder)  # no error

    bad = dict(item, label=7, annotated_slices=[2, 2])
    problems = validate_item(bad, folder, where="demo[9]")
    assert problems == ["demo[9] (case_000_image.nii.gz): label 7 is not 0 or 1",
                        "demo[9] (case_000_image.nii.gz): annotated_slices has duplicates [2]"]
    with pytest.raises(DatalistError) as info:
        assert_valid_item(bad, folder)
    message = str(info.value)
    assert message.startswith("2 problem(s):") and "label 7" in message and "duplicates [2]" in message
    assert isinstance(info.value, ValueError)

    # Without dataset_dir relative paths resolve against the working directory: here they do not exist.
    assert any("file not found" in p for p in validate_item(item))


def test_uncompressed_truncated_nifti_is_reported(tmp_path):
    image = tmp_path / "img.nii"
    write_nifti(image, np.ones((16, 16, 8), np.float32))
    image.write_bytes(image.read_bytes()[:-100])
    problems = validate_item({"image": str(image), "label": 0})
    assert len(problems) == 1 and str(image) in problems[0] and "not a readable NIfTI" in problems[0]


def test_python_m_due_ext_data_check(tiny_dataset, broken_dataset):
    """The real entry point: exit 0 with the summary on a good datalist, 1 naming the file on a bad one."""
    bad = broken_dataset(_delete_file("mask"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    good_run, bad_run = (subprocess.run([sys.executable, "-m", "due_ext", "data", "check", str(path)], cwd=REPO,
                                        env=env, capture_output=True, text=True, timeout=120)
                         for path in (tiny_dataset, bad))
    assert good_run.returncode == 0, good_run.stderr
    assert "valid" in good_run.stdout and "training 4 (2 pos, 2 neg)" in good_run.stdout
    assert bad_run.returncode == 1
    assert "case_000_mask.nii.gz: file not found" in bad_run.stderr
    assert f"{bad}: 1 problem(s) found" in bad_run.stderr
