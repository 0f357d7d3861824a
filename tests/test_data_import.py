"""`python -m due_ext data import`: every input format, annotated slices, labels, the patient split, and every
kind of bad input rejected with the file named and nothing written."""

from __future__ import annotations

import json
import locale
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from due_ext.cli import main as cli_main
from due_ext.data import schema
from due_ext.data.importing import DataImportError, import_dataset
from due_ext.data.nifti import read_nifti, write_nifti
from due_ext.data.readers import read_volume, segment_mask, sitk_to_ras
from due_ext.data.validate import check_datalist, validate_item

SHAPE = (12, 10, 8)
#: An oblique, anisotropic RAS affine, so that axis order and sign mistakes show.
AFFINE = np.array([[0.0, -0.8, 0.0, 40.0],
                   [0.9, 0.0, 0.0, -30.0],
                   [0.0, 0.0, 2.5, 12.5],
                   [0.0, 0.0, 0.0, 1.0]])
#: NIfTI stores the affine in float32 (sform): a coordinate near 40 mm is off by up to 40 * 2**-24 ~ 2.4e-6.
AFFINE_TOL = 1e-5


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, SHAPE).astype(np.int16)


def _drawing(slices: list[int]) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    for z in slices:
        mask[3:7, 2:6, z] = 1
    return mask


def _to_sitk(array: np.ndarray, affine: np.ndarray, vector: bool = False) -> sitk.Image:
    """An (X, Y, Z[, C]) array with a RAS affine as a SimpleITK image (LPS geometry)."""
    data = np.moveaxis(array, (0, 1, 2), (2, 1, 0)) if vector else array.transpose(2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data), isVector=vector)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def _write_seg_nrrd(path: Path, array: np.ndarray, segments: list[tuple[str, int, int]],
                    affine: np.ndarray = AFFINE) -> None:
    """A 3D Slicer-style segmentation: label values per layer and SegmentN_* header entries."""
    image = _to_sitk(array, affine, vector=array.ndim == 4)
    for i, (name, value, layer) in enumerate(segments):
        image.SetMetaData(f"Segment{i}_Name", name)
        image.SetMetaData(f"Segment{i}_LabelValue", str(value))
        image.SetMetaData(f"Segment{i}_Layer", str(layer))
    sitk.WriteImage(image, str(path), useCompression=True)


def _write_dicom_series(folder: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """One file per axial slice, geometry in the standard tags (SimpleITK's DICOM-series-from-array recipe).

    SimpleITK's DICOM writer (GDCM) switches the process's C locale to "C" and leaves it there: every later
    ``subprocess.run(text=True)`` of the test session would then decode UTF-8 output as ASCII and fail. The
    writer is only a fixture here (DUE reads DICOM, it never writes it), so the locale is restored around it."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_slices(folder, array, affine)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(folder: Path, array: np.ndarray, affine: np.ndarray) -> None:
    folder.mkdir(parents=True)
    volume = _to_sitk(array, affine)
    direction = volume.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.42"
    for z in range(volume.GetDepth()):
        piece = volume[:, :, z]
        tags = {"0008|0060": "CT", "0020|000d": series_uid + ".1", "0020|000e": series_uid,
                "0020|0052": series_uid + ".2", "0010|0020": "P1",
                "0008|0018": f"{series_uid}.{z + 100}", "0020|0013": str(z + 1),
                "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3])),
                "0020|0032": "\\".join(f"{v:.6f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, z))),
                "0018|0050": f"{volume.GetSpacing()[2]:.6f}"}
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{z:03d}.dcm"))
        writer.Execute(piece)


def _case(root: Path, case: str, slices: list[int] | None, seed: int = 0, suffix: str = "") -> None:
    """A NIfTI image in root/images and, when ``slices`` is given, a drawing on them in root/labels."""
    write_nifti(root / "images" / f"{case}.nii.gz", _image(seed), AFFINE)
    if slices is not None:
        write_nifti(root / "labels" / f"{case}{suffix}.nii.gz", _drawing(slices), AFFINE)


def _items(datalist: dict) -> dict[str, dict]:
    """Items of every section by case id (the image file's name up to the first dot or _image)."""
    found = {}
    for section in ("training", "validation", "test"):
        for item in datalist[section]:
            case = Path(item[schema.IMAGE]).name.split(".")[0].removesuffix("_image")
            found[case] = item
    return found


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        cli_main(argv)
        status = 0
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def _no_absolute_paths(datalist: dict) -> None:
    for section in ("training", "validation", "test"):
        for item in datalist[section]:
            for key in schema.VOLUME_KEYS:
                if key in item:
                    assert not Path(item[key]).is_absolute(), item[key]


def test_nifti_import_pairs_by_name_and_records_drawn_slices(tmp_path, capsys):
    for i, slices in enumerate(([1, 3, 5], [0, 7], [2, 3, 4])):
        _case(tmp_path, f"case_{i}", slices, seed=i, suffix="_seg")
    for i in range(3, 5):
        _case(tmp_path, f"case_{i}", None, seed=i)
    out = tmp_path / "out" / "datalist.json"
    status, stdout, stderr = _run(["data", "import", "--images", str(tmp_path / "images"), "--labels",
                                   str(tmp_path / "labels"), "--label-suffix", "_seg", "--out", str(out),
                                   "--fractions", "0.6,0.2,0.2", "--name", "2024"], capsys)
    assert status == 0, stderr
    assert "datalist.json" in stdout
    datalist = json.loads(out.read_text())
    assert datalist["name"] == "2024"  # fire reads 2024 as an int; the datalist keeps a string
    items = _items(datalist)
    assert sorted(items) == [f"case_{i}" for i in range(5)]
    assert [items[f"case_{i}"][schema.ANNOTATED_SLICES] for i in range(3)] == [[1, 3, 5], [0, 7], [2, 3, 4]]
    assert [items[f"case_{i}"][schema.LABEL] for i in range(5)] == [1, 1, 1, 0, 0]
    assert all(schema.ANNOTATION not in items[f"case_{i}"] for i in (3, 4))
    # NIfTI inputs are referenced where they are, relative to the datalist's folder; nothing is converted.
    assert items["case_0"][schema.IMAGE] == "../images/case_0.nii.gz"
    assert items["case_0"][schema.ANNOTATION] == "../labels/case_0_seg.nii.gz"
    assert not (out.parent / "datalist_nifti").exists()
    _no_absolute_paths(datalist)
    # 3 positive patients: 1.8, 0.6, 0.6 -> 2, 1, 0 by largest remainder; 2 negatives: 1.2, 0.4, 0.4 -> 1, 0, 1
    # (the tie between validation and test goes to test, which the positives left short).
    assert [len(datalist[s]) for s in ("training", "validation", "test")] == [3, 1, 1]
    status, stdout, stderr = _run(["data", "check", str(out)], capsys)
    assert status == 0, stderr
    assert "valid" in stdout and "8 annotated slices on 3 positives" in stdout


def test_sitk_geometry_is_the_nifti_affine(tmp_path):
    """ITK reads a NIfTI in LPS; converted back it must equal nibabel's affine, axes in (X, Y, Z) order."""
    path = write_nifti(tmp_path / "v.nii.gz", _image(), AFFINE)
    array, affine = sitk_to_ras(sitk.ReadImage(str(path)))
    np.testing.assert_array_equal(array, _image())
    np.testing.assert_allclose(affine, nib.load(path).affine, atol=AFFINE_TOL)


def test_nrrd_image_and_seg_nrrd_segments_are_converted(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image = _image()
    sitk.WriteImage(_to_sitk(image, AFFINE), str(tmp_path / "images" / "ct_1.nrrd"))
    labels = _drawing([2, 4]) + 2 * _drawing([6]).astype(np.uint8)  # tumour (1) on 2, 4; vessel (2) on 6
    _write_seg_nrrd(tmp_path / "labels" / "ct_1.seg.nrrd", labels, [("tumour", 1, 0), ("vessel", 2, 0)])
    out = tmp_path / "dl.json"

    import_dataset(tmp_path / "images", out, labels=tmp_path / "labels", segments=["tumour"], fractions="1,0,0")
    item = json.loads(out.read_text())["training"][0]
    assert item[schema.IMAGE] == "dl_nifti/ct_1_image.nii.gz"
    assert item[schema.ANNOTATION] == "dl_nifti/ct_1_annotation.nii.gz"
    assert item[schema.ANNOTATED_SLICES] == [2, 4]
    copied, affine = read_nifti(tmp_path / item[schema.IMAGE])
    np.testing.assert_array_equal(copied, image)
    np.testing.assert_allclose(affine, AFFINE, atol=AFFINE_TOL)
    np.testing.assert_array_equal(read_nifti(tmp_path / item[schema.ANNOTATION])[0], _drawing([2, 4]))
    assert check_datalist(out).valid

    # All segments by default: the vessel's slice is drawn too. A second import replaces the first's copies.
    import_dataset(tmp_path / "images", out, labels=tmp_path / "labels", fractions="1,0,0")
    assert json.loads(out.read_text())["training"][0][schema.ANNOTATED_SLICES] == [2, 4, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl.json", "dl_nifti", "images", "labels"]

    with pytest.raises(DataImportError, match=r"ct_1\.seg\.nrrd: no segment named 'liver'"):
        import_dataset(tmp_path / "images", tmp_path / "other.json", labels=tmp_path / "labels",
                       segments=["liver"])


def test_seg_nrrd_layers_and_cropped_extent(tmp_path):
    """Overlapping segments live on separate layers; Slicer crops the segmentation to the segments' extent."""
    write_nifti(tmp_path / "images" / "p.nii.gz", _image(), AFFINE)
    (tmp_path / "labels").mkdir()
    layers = np.stack([_drawing([1, 2]), _drawing([2, 5])], axis=-1)  # overlap on slice 2
    # Crop to x in [2, 9), y in [1, 8), z in [1, 7): the crop's origin is voxel (2, 1, 1) of the image.
    cropped = np.ascontiguousarray(layers[2:9, 1:8, 1:7])
    crop_affine = AFFINE.copy()
    crop_affine[:3, 3] = AFFINE[:3, :3] @ [2, 1, 1] + AFFINE[:3, 3]
    _write_seg_nrrd(tmp_path / "labels" / "p.seg.nrrd", cropped, [("a", 1, 0), ("b", 1, 1)], crop_affine)
    assert read_volume(tmp_path / "labels" / "p.seg.nrrd").array.shape == (7, 7, 6, 2)

    out = tmp_path / "d.json"
    import_dataset(tmp_path / "images", out, labels=tmp_path / "labels", fractions="1,0,0")
    item = json.loads(out.read_text())["training"][0]
    assert item[schema.ANNOTATED_SLICES] == [1, 2, 5]
    np.testing.assert_array_equal(read_nifti(tmp_path / item[schema.ANNOTATION])[0], _drawing([1, 2, 5]))
    assert item[schema.IMAGE] == "images/p.nii.gz"  # the NIfTI image is not copied
    assert check_datalist(out).valid


def test_dicom_series_image(tmp_path, monkeypatch):
    image = _image()
    _write_dicom_series(tmp_path / "images" / "pat_7", image, AFFINE)
    write_nifti(tmp_path / "labels" / "pat_7.nii.gz", _drawing([3]), AFFINE)
    monkeypatch.chdir(tmp_path)  # relative paths on the command line, as a user types them
    import_dataset("images", "sub/datalist.json", labels="labels", fractions="1,0,0")
    out = tmp_path / "sub" / "datalist.json"
    item = json.loads(out.read_text())["training"][0]
    assert item[schema.IMAGE] == "datalist_nifti/pat_7_image.nii.gz"
    assert item[schema.ANNOTATION] == "../labels/pat_7.nii.gz"
    copied, affine = read_nifti(out.parent / item[schema.IMAGE])
    np.testing.assert_array_equal(copied, image)
    # DICOM positions are written with 6 decimals: 5e-7 mm, below the float32 NIfTI rounding.
    np.testing.assert_allclose(affine, AFFINE, atol=AFFINE_TOL)
    assert check_datalist(out).valid


def test_dicom_label_without_the_extra_names_it(tmp_path, monkeypatch):
    write_nifti(tmp_path / "images" / "c.nii.gz", _image(), AFFINE)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "c.dcm").write_bytes(b"\0" * 128 + b"DICM")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import fails as when the extra is not installed
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(DataImportError) as raised:
        import_dataset(tmp_path / "images", tmp_path / "d.json", labels=tmp_path / "labels")
    assert len(raised.value.problems) == 1
    assert "c.dcm" in raised.value.problems[0]
    assert "pip install 'due-ext[dicom]'" in raised.value.problems[0]
    assert not (tmp_path / "d.json").exists()


def _write_dicom_seg(path: Path, series: Path, labels: np.ndarray, names: list[str]) -> None:
    """A binary DICOM SEG of ``series``: label value i + 1 of the (X, Y, Z) ``labels`` is segment ``names[i]``."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in sorted(series.iterdir())]  # slice_000 ... in Z order
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=name, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for i, name in enumerate(names)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.ascontiguousarray(labels.transpose(2, 1, 0)),  # (frames, rows, cols)
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    seg.save_as(path)


def test_dicom_seg_on_a_dicom_series(tmp_path):
    pytest.importorskip("highdicom", reason="DICOM SEG is read with the dicom extra (highdicom)")
    import pydicom

    _write_dicom_series(tmp_path / "images" / "c1", _image(), AFFINE)
    (tmp_path / "labels").mkdir()
    labels = np.maximum(_drawing([2, 5]), 2 * _drawing([6]))  # tumour on 2 and 5, vessel on 6
    _write_dicom_seg(tmp_path / "labels" / "c1.dcm", tmp_path / "images" / "c1", labels, ["tumour", "vessel"])
    out = tmp_path / "d.json"
    import_dataset(tmp_path / "images", out, labels=tmp_path / "labels", segments=["tumour"], fractions="1,0,0")
    item = json.loads(out.read_text())["training"][0]
    assert item[schema.ANNOTATED_SLICES] == [2, 5]
    annotation, affine = read_nifti(tmp_path / item[schema.ANNOTATION])
    np.testing.assert_array_equal(annotation, _drawing([2, 5]))
    np.testing.assert_allclose(affine, AFFINE, atol=AFFINE_TOL)
    assert check_datalist(out).valid
    import_dataset(tmp_path / "images", out, labels=tmp_path / "labels", fractions="1,0,0")
    assert json.loads(out.read_text())["training"][0][schema.ANNOTATED_SLICES] == [2, 5, 6]

    # An RT structure set is recognised and refused with what to do instead.
    rt = pydicom.dcmread(tmp_path / "labels" / "c1.dcm")
    rt.Modality = "RTSTRUCT"
    rt.save_as(tmp_path / "labels" / "c1.dcm")
    with pytest.raises(DataImportError, match=r"c1\.dcm: RT structure sets are not supported; export"):
        import_dataset(tmp_path / "images", tmp_path / "e.json", labels=tmp_path / "labels")


def test_empty_slices_count_as_annotated(tmp_path):
    _case(tmp_path, "a", [2])
    write_nifti(tmp_path / "labels" / "b.nii.gz", np.zeros(SHAPE, np.uint8), AFFINE)  # looked at, nothing found
    write_nifti(tmp_path / "images" / "b.nii.gz", _image(1), AFFINE)
    sidecar = tmp_path / "empty.json"
    sidecar.write_text(json.dumps({"a": [5, 0], "b": [1, 4]}))
    out = tmp_path / "d.json"
    import_dataset(tmp_path / "images", out, labels=tmp_path / "labels", empty_slices=sidecar, fractions="1,0,0")
    items = _items(json.loads(out.read_text()))
    assert items["a"][schema.ANNOTATED_SLICES] == [0, 2, 5]
    assert items["a"][schema.EMPTY_SLICES] == [0, 5]
    assert items["a"][schema.LABEL] == 1
    assert items["b"][schema.LABEL] == 0  # no drawing anywhere: a negative whose slices were looked at
    assert items["b"][schema.ANNOTATED_SLICES] == [1, 4]
    report = check_datalist(out)
    assert report.valid, report.problems
    assert report.annotated_slices == 5

    # The standard loading pipeline marks the empty slices as annotated and drops the list (it cannot collate).
    from due_ext.data.transforms import ANNOTATED_MASK, load_transforms

    loaded = load_transforms([schema.IMAGE, schema.ANNOTATION])(
        {k: (str(tmp_path / v) if k in schema.VOLUME_KEYS else v) for k, v in items["a"].items()})
    assert schema.EMPTY_SLICES not in loaded
    assert [int(z) for z in np.nonzero(loaded[ANNOTATED_MASK][0, 0, 0].numpy())[0]] == [0, 2, 5]

    sidecar.write_text(json.dumps({"a": [2]}))  # slice 2 holds the drawing
    with pytest.raises(DataImportError, match=r"a\.nii\.gz: slice\(s\) \[2\] listed as looked at and left empty"):
        import_dataset(tmp_path / "images", tmp_path / "e.json", labels=tmp_path / "labels", empty_slices=sidecar)


def test_validator_checks_empty_slices(tmp_path):
    _case(tmp_path, "a", [2])
    item = {schema.IMAGE: "images/a.nii.gz", schema.LABEL: 1, schema.ANNOTATION: "labels/a.nii.gz",
            schema.ANNOTATED_SLICES: [2, 4], schema.EMPTY_SLICES: [4]}
    assert validate_item(item, tmp_path) == []
    assert validate_item({**item, schema.EMPTY_SLICES: []}, tmp_path) == [
        f"item (a.nii.gz): annotation {tmp_path / 'labels/a.nii.gz'}: annotated slice(s) [4] hold no foreground"]
    assert validate_item({**item, schema.EMPTY_SLICES: [2, 4]}, tmp_path) == [
        "item (a.nii.gz): positive (label 1) whose annotated slices are all listed in empty_slices",
        f"item (a.nii.gz): annotation {tmp_path / 'labels/a.nii.gz'}: slice(s) [2] listed in empty_slices hold "
        "foreground"]
    assert validate_item({**item, schema.EMPTY_SLICES: [4, 6]}, tmp_path) == [
        "item (a.nii.gz): empty_slices [6] not in annotated_slices"]


def test_labels_from_csv(tmp_path):
    _case(tmp_path, "pos", [3])
    _case(tmp_path, "neg", None)
    _case(tmp_path, "later", None)
    csv = tmp_path / "labels.csv"
    csv.write_text("case,label\npos,1\nneg,0\nlater,\n")
    out = tmp_path / "d.json"
    summary = import_dataset(tmp_path / "images", out, labels=tmp_path / "labels", labels_csv=csv, fractions="1,0,0")
    items = _items(json.loads(out.read_text()))
    assert {case: item[schema.LABEL] for case, item in items.items()} == {"pos": 1, "neg": 0}
    assert summary.unlabelled == ["later"]

    csv.write_text("case,label\npos,0\nneg,1\nghost,1\n")
    with pytest.raises(DataImportError) as raised:
        import_dataset(tmp_path / "images", tmp_path / "e.json", labels=tmp_path / "labels", labels_csv=csv)
    problems = "\n".join(raised.value.problems)
    assert "labels.csv: case 'ghost' has no image" in problems
    assert "later.nii.gz: case 'later' is not in" in problems
    assert "neg.nii.gz: case 'neg' has label 1 in" in problems and "no drawing" in problems
    assert "pos.nii.gz: case 'pos' has label 0 in" in problems
    assert len(raised.value.problems) == 4


@pytest.mark.parametrize("source", ["regex", "csv"])
def test_split_keeps_a_patients_cases_together(tmp_path, source):
    patients = {f"p{p}": [f"p{p}_s{s}" for s in range(p % 3 + 1)] for p in range(10)}
    rows = ["case,label,patient"]
    for p, (patient, cases) in enumerate(patients.items()):
        for case in cases:
            _case(tmp_path, case, [1, 2] if p % 2 else None)
            rows.append(f"{case},{p % 2},{patient}")
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    options = ({"patient_regex": r"^(p\d+)_"} if source == "regex" else {"labels_csv": tmp_path / "l.csv"})

    def split(seed: int, name: str) -> dict[str, str]:
        out = tmp_path / name
        import_dataset(tmp_path / "images", out, labels=tmp_path / "labels", seed=seed, **options)
        datalist = json.loads(out.read_text())
        return {Path(item[schema.IMAGE]).name.split(".")[0]: section
                for section in ("training", "validation", "test") for item in datalist[section]}

    first = split(0, "a.json")
    assert sorted(first) == sorted(c for cases in patients.values() for c in cases)
    for cases in patients.values():
        assert len({first[c] for c in cases}) == 1, cases
    # 5 positive and 5 negative patients, 0.7/0.15/0.15 each: 3.5, 0.75, 0.75 -> 3, 1, 1 per stratum.
    by_section = {s: {c.split("_")[0] for c, sec in first.items() if sec == s} for s in ("training", "validation",
                                                                                          "test")}
    assert [len(by_section[s]) for s in ("training", "validation", "test")] == [6, 2, 2]
    assert split(0, "b.json") == first
    assert any(split(seed, f"s{seed}.json") != first for seed in (1, 2, 3))


def _bad_dimensionality(root: Path) -> str:
    write_nifti(root / "images" / "bad.nii.gz", np.zeros((12, 10, 8, 3), np.int16), AFFINE)
    write_nifti(root / "labels" / "bad.nii.gz", _drawing([1]), AFFINE)
    return r"images/bad\.nii\.gz: image has shape \(12, 10, 8, 3\), not a 3D volume"


def _bad_shape(root: Path) -> str:
    write_nifti(root / "labels" / "bad.nii.gz", _drawing([1])[:, :, :7], AFFINE)
    return r"labels/bad\.nii\.gz: label shape \(12, 10, 7\) != image shape \(12, 10, 8\)"


def _bad_affine(root: Path) -> str:
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    write_nifti(root / "labels" / "bad.nii.gz", _drawing([1]), shifted)
    return r"labels/bad\.nii\.gz: label affine differs from the image's .*max abs difference 1\)"


def _bad_values(root: Path) -> str:
    write_nifti(root / "labels" / "bad.nii.gz", 2 * _drawing([1]), AFFINE)
    return r"labels/bad\.nii\.gz: label values 2 outside \{0, 1\}"


def _no_drawing(root: Path) -> str:
    write_nifti(root / "labels" / "bad.nii.gz", np.zeros(SHAPE, np.uint8), AFFINE)
    return r"labels/bad\.nii\.gz: no drawing at all"


def _unreadable(root: Path) -> str:
    (root / "images" / "bad.nii.gz").write_bytes(b"not a nifti file")
    return r"images/bad\.nii\.gz: not a readable NIfTI file"


def _unreadable_nrrd(root: Path) -> str:
    (root / "labels" / "bad.nii.gz").unlink()
    (root / "labels" / "bad.nrrd").write_text("NRRD0004\ntype: nonsense\n")
    return r"labels/bad\.nrrd: not a readable NRRD file"


def _duplicate(root: Path) -> str:
    nib.save(nib.Nifti1Image(_image(), AFFINE), root / "images" / "bad.nii")
    return r"images/bad\.nii(\.gz)?: duplicate case name 'bad' \(images bad\.nii, bad\.nii\.gz\)"


def _orphan_label(root: Path) -> str:
    write_nifti(root / "labels" / "stray.nii.gz", _drawing([1]), AFFINE)
    return r"labels/stray\.nii\.gz: label of case 'stray' has no image"


def _unknown_file(root: Path) -> str:
    (root / "images" / "notes.txt").write_text("scan list")
    return r"images/notes\.txt: not a NIfTI"


@pytest.mark.parametrize("breaks", [_bad_dimensionality, _bad_shape, _bad_affine, _bad_values, _no_drawing,
                                    _unreadable, _unreadable_nrrd, _duplicate, _orphan_label, _unknown_file],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_input_names_the_file_and_writes_nothing(tmp_path, capsys, breaks):
    _case(tmp_path, "good", [1, 4])
    _case(tmp_path, "bad", [2])
    expected = breaks(tmp_path)
    out = tmp_path / "out" / "datalist.json"
    status, stdout, stderr = _run(["data", "import", str(tmp_path / "images"), str(out), "--labels",
                                   str(tmp_path / "labels")], capsys)
    assert status == 1
    lines = stderr.strip().splitlines()
    assert lines[-1] == "1 problem(s) found; nothing written"
    assert len(lines) == 2, lines
    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()  # not even the folder


def test_every_problem_is_reported_together(tmp_path):
    _case(tmp_path, "a", [1])
    _case(tmp_path, "b", [1])
    _case(tmp_path, "c", [1])
    (tmp_path / "out").mkdir()
    write_nifti(tmp_path / "labels" / "a.nii.gz", 3 * _drawing([1]), AFFINE)
    write_nifti(tmp_path / "labels" / "c.nii.gz", np.zeros(SHAPE, np.uint8), AFFINE)
    with pytest.raises(DataImportError) as raised:
        import_dataset(tmp_path / "images", tmp_path / "out" / "d.json", labels=tmp_path / "labels")
    assert [Path(p.split(":")[0]).name for p in raised.value.problems] == ["a.nii.gz", "c.nii.gz"]
    assert list((tmp_path / "out").iterdir()) == []  # the existing folder is left as it was


def test_malformed_options_are_rejected(tmp_path, capsys):
    _case(tmp_path, "a", [1])
    status, _, stderr = _run(["data", "import", str(tmp_path / "images"), str(tmp_path / "d.json"),
                              "--fractions", "0.5,0.2"], capsys)
    assert status == 2 and "fractions" in stderr
    with pytest.raises(ValueError, match="patient regex"):
        import_dataset(tmp_path / "images", tmp_path / "d.json", patient_regex="(")


def test_unusable_files_give_no_follow_on_problems(tmp_path):
    """A label that cannot be read is one problem, not also 'label 1 in the CSV but no drawing'."""
    _case(tmp_path, "a", [1])
    write_nifti(tmp_path / "labels" / "a.nii.gz", np.zeros((12, 10, 7), np.uint8), AFFINE)
    (tmp_path / "l.csv").write_text("case,label\na,1\n")
    with pytest.raises(DataImportError) as raised:
        import_dataset(tmp_path / "images", tmp_path / "d.json", labels=tmp_path / "labels",
                       labels_csv=tmp_path / "l.csv")
    assert len(raised.value.problems) == 1 and "label shape (12, 10, 7)" in raised.value.problems[0]


def test_seg_nrrd_as_3d_slicer_writes_it(tmp_path):
    """A header as 3D Slicer writes it: RAS space, a 'list' axis of layers first, SegmentN_* keys with ':='."""
    layers = np.zeros((2, 4, 3, 2), np.uint8)  # (layer, i, j, k): NRRD's fastest axis first
    layers[0, 1, 1, 0] = 1
    layers[1, 2, 0, 1] = 1
    header = ("NRRD0004\ntype: unsigned char\ndimension: 4\nspace: right-anterior-superior\nsizes: 2 4 3 2\n"
              "space directions: none (1.5,0,0) (0,2,0) (0,0,3)\nkinds: list domain domain domain\n"
              "encoding: raw\nspace origin: (10,20,30)\n"
              "Segment0_ID:=Segment_1\nSegment0_LabelValue:=1\nSegment0_Layer:=0\nSegment0_Name:=tumour\n"
              "Segment1_ID:=Segment_2\nSegment1_LabelValue:=1\nSegment1_Layer:=1\nSegment1_Name:=node\n\n")
    path = tmp_path / "s.seg.nrrd"
    path.write_bytes(header.encode() + layers.tobytes(order="F"))
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.affine, [[1.5, 0, 0, 10], [0, 2, 0, 20], [0, 0, 3, 30], [0, 0, 0, 1]])
    assert [s.name for s in volume.segments] == ["tumour", "node"]
    assert np.argwhere(segment_mask(volume)).tolist() == [[1, 1, 0], [2, 0, 1]]
    assert np.argwhere(segment_mask(volume, ["node"])).tolist() == [[2, 0, 1]]
