"""Dictionary transforms: sparse annotation, filling missing keys, resizing with slice remapping, the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset, MetaTensor, load_decathlon_datalist
from monai.transforms import Compose, Invertd

from due_ext.data.axes import foreground_slices
from due_ext.data.transforms import (
    ANNOTATED_MASK,
    HAS_ANNOTATION,
    FillMissingExplanationKeysd,
    ResampleToSized,
    SparseAnnotationd,
    ValidateItemd,
    load_transforms,
    remap_slices,
)
from due_ext.data.validate import DatalistError

ALL_KEYS = ["image", "annotation", "interpolation", "variance", "weights", "mask"]


def _meta(array: np.ndarray | torch.Tensor, name: str = "/data/x.nii.gz", spacing: float = 1.0) -> MetaTensor:
    affine = torch.diag(torch.tensor([spacing, spacing, 2 * spacing, 1.0], dtype=torch.float64))
    return MetaTensor(torch.as_tensor(array, dtype=torch.float32), affine=affine,
                      meta={"filename_or_obj": name})


def _positive(size=(8, 8, 8), slices=(1, 4, 6)) -> dict:
    """A loaded positive whose annotation has foreground on every slice, different per slice."""
    x, y, _ = size
    annotation = torch.zeros((1, *size))
    for z in range(size[2]):
        annotation[0, : 2 + z % (x - 2), 1:4, z] = 1  # slice z: a block of 2 + z rows
    image = torch.arange(np.prod(size), dtype=torch.float32).reshape(1, *size) / np.prod(size)
    return {"image": _meta(image, "/data/img.nii.gz"), "annotation": _meta(annotation, "/data/ann.nii.gz"),
            "annotated_slices": list(slices), "label": 1}


def test_sparse_annotation_keeps_only_annotated_slices():
    item = _positive()
    full = item["annotation"].clone()
    out = SparseAnnotationd()(item)
    assert foreground_slices(out["annotation"].numpy()) == [1, 4, 6]
    for z in (1, 4, 6):
        torch.testing.assert_close(out["annotation"][..., z], full[..., z])
    mask = out[ANNOTATED_MASK]
    assert mask.shape == full.shape and mask.dtype == torch.float32
    assert mask[0, :, :, [1, 4, 6]].eq(1).all() and mask[0, :, :, [0, 2, 3, 5, 7]].eq(0).all()
    assert isinstance(out["annotation"], MetaTensor) and isinstance(mask, MetaTensor)
    torch.testing.assert_close(mask.affine, full.affine)
    assert item["annotation"].eq(full).all()  # the input item is not modified


def test_sparse_annotation_passes_negatives_and_rejects_bad_items():
    negative = {"image": _meta(torch.zeros(1, 4, 4, 4)), "label": 0}
    assert SparseAnnotationd()(negative).keys() == negative.keys()
    item = _positive()
    del item["annotated_slices"]
    with pytest.raises(DatalistError, match="/data/ann.nii.gz: annotation present but 'annotated_slices' missing"):
        SparseAnnotationd()(item)
    with pytest.raises(DatalistError, match=r"/data/ann.nii.gz: annotated_slices \[8\] outside \[0, 8\)"):
        SparseAnnotationd()(_positive(slices=(2, 8)))
    with pytest.raises(DatalistError, match="channel-first"):
        SparseAnnotationd()({"annotation": torch.zeros(4, 4, 4), "annotated_slices": [1]})


def test_fill_missing_keys_for_negatives():
    image = _meta(torch.rand(1, 6, 5, 4), "/data/neg.nii.gz", spacing=1.5)
    out = FillMissingExplanationKeysd()({"image": image, "label": 0})
    assert out[HAS_ANNOTATION].item() == 0.0 and out[HAS_ANNOTATION].dtype == torch.float32
    for key in ("annotation", ANNOTATED_MASK, "interpolation", "mask"):
        assert out[key].shape == (1, 6, 5, 4) and out[key].eq(0).all(), key
    assert out["weights"].eq(1).all()  # missing weights = unweighted loss
    assert "variance" not in out  # not in the default keys
    assert isinstance(out["annotation"], MetaTensor)
    torch.testing.assert_close(out["annotation"].affine, image.affine)
    out["annotation"].affine[0, 0] = 9.0  # filled volumes own their affine
    assert image.affine[0, 0] == 1.5


def test_fill_keeps_present_keys_and_custom_values():
    item = SparseAnnotationd()(_positive())
    item["weights"] = _meta(torch.full((1, 8, 8, 8), 0.25))
    out = FillMissingExplanationKeysd(keys=["annotation", "weights", "variance"], fill_values={"variance": 2.0})(item)
    assert out[HAS_ANNOTATION].item() == 1.0
    assert out["annotation"] is item["annotation"] and out["weights"] is item["weights"]
    assert out["variance"].eq(2.0).all()
    with pytest.raises(KeyError, match="reference key 'image' missing"):
        FillMissingExplanationKeysd()({"label": 0})


def test_remap_slices_by_hand():
    assert remap_slices([0, 3, 7], 8, 8) == {0: 0, 3: 3, 7: 7}
    assert remap_slices([2, 4, 6], 8, 4) == {1: 2, 2: 4, 3: 6}
    assert remap_slices([4, 5], 8, 4) == {2: 4}  # both land on slice 2 (centre 4.5): tie -> lower index
    assert remap_slices([3, 4, 5], 12, 4) == {1: 4}  # slice 1's centre is source 4.0
    assert remap_slices([2, 4], 8, 16) == {5: 2, 9: 4}
    assert remap_slices([7], 8, 3) == {2: 7}
    assert remap_slices([], 8, 4) == {}
    with pytest.raises(ValueError, match="annotated slice 8 outside"):
        remap_slices([8], 8, 4)
    with pytest.raises(ValueError, match="depths must be positive"):
        remap_slices([0], 8, 0)


@settings(max_examples=200, deadline=None)
@given(depth=st.integers(1, 40), new_depth=st.integers(1, 40), data=st.data())
def test_remap_slices_lands_each_centre_in_its_new_slice(depth, new_depth, data):
    slices = data.draw(st.lists(st.integers(0, depth - 1), unique=True))
    mapping = remap_slices(slices, depth, new_depth)
    assert list(mapping) == sorted(mapping) and all(0 <= t < new_depth for t in mapping)
    scale = new_depth / depth
    for target, source in mapping.items():
        assert source in slices
        assert target <= (source + 0.5) * scale < target + 1 + 1e-9
    # Every new slice that holds a source centre gets exactly one source.
    assert set(mapping) == {min(new_depth - 1, int((s + 0.5) * scale)) for s in slices}


@pytest.mark.parametrize("size", [(4, 4, 4), (12, 10, 16), (8, 8, 8)])
def test_resample_keeps_sparse_annotation_consistent(size):
    item = SparseAnnotationd()(_positive(slices=(1, 4, 5, 6)))
    item["interpolation"] = _meta(torch.rand(1, 8, 8, 8))
    item["mask"] = _meta((torch.rand(1, 8, 8, 8) > 0.5).float())
    before = {k: v.clone() for k, v in item.items() if isinstance(v, torch.Tensor)}
    keys = ["image", "annotation", ANNOTATED_MASK, "interpolation", "mask"]
    out = ResampleToSized(keys, list(size))(item)

    mapping = remap_slices([1, 4, 5, 6], 8, size[2])
    assert out["annotated_slices"] == list(mapping)
    for key in keys:
        assert tuple(out[key].shape) == (1, *size), key
    assert foreground_slices(out["annotation"].numpy()) == list(mapping)
    assert foreground_slices(out[ANNOTATED_MASK].numpy()) == list(mapping)
    assert out[ANNOTATED_MASK][..., list(mapping)].eq(1).all()
    for target, source in mapping.items():  # each annotated slice copied, resized in-plane by nearest
        expected = F.interpolate(before["annotation"][None, ..., source], size=size[:2], mode="nearest-exact")[0]
        torch.testing.assert_close(out["annotation"][..., target].as_tensor(), expected.as_tensor())
    expected_image = F.interpolate(before["image"][None].as_tensor(), size=size, mode="trilinear")[0]
    torch.testing.assert_close(out["image"].as_tensor(), expected_image)
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    assert 0 <= out["interpolation"].min() and out["interpolation"].max() <= 1
    # Metadata follows the new grid: spacing scales with old/new size.
    spacing = out["annotation"].affine.diagonal()[:3]
    torch.testing.assert_close(spacing, torch.tensor([8 / size[0], 8 / size[1], 2 * 8 / size[2]],
                                                     dtype=torch.float64))
    torch.testing.assert_close(out["annotation"].affine, out["image"].affine)


def test_resample_without_slices_treats_annotation_as_a_mask():
    item = _positive()
    del item["annotated_slices"]
    out = ResampleToSized(["image", "annotation"], "4,4,4")(item)
    expected = F.interpolate(item["annotation"][None].as_tensor(), size=(4, 4, 4), mode="nearest-exact")[0]
    torch.testing.assert_close(out["annotation"].as_tensor(), expected)
    assert "annotated_slices" not in out


def test_resample_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"keys \['label'\] are neither the image"):
        ResampleToSized(["image", "label"], (4, 4, 4))
    with pytest.raises(ValueError, match="size"):
        ResampleToSized(["image"], "4,4")
    item = _positive()
    item["mask"] = _meta(torch.zeros(1, 8, 8, 7))
    with pytest.raises(ValueError, match=r"different Z sizes \[7, 8\]"):
        ResampleToSized(["image", "annotation", "mask"], (4, 4, 4))(item)


def test_resample_is_inverted_back_to_the_input_grid():
    """Invertd undoes the resize of the image (what inference does to put a CAM back on the input's grid)."""
    item = _positive(size=(8, 6, 4), slices=(1, 3))
    resample = Compose([ResampleToSized(["image", "annotation"], (4, 4, 8))])
    out = resample(item)
    assert out["image"].shape == (1, 4, 4, 8)
    cam = MetaTensor(torch.full((1, 4, 4, 8), 0.25))
    back = Invertd("cam", transform=resample, orig_keys="image", nearest_interp=False)({**out, "cam": cam})["cam"]
    assert back.shape == (1, 8, 6, 4)
    torch.testing.assert_close(back.affine, item["image"].affine)
    # a constant stays constant through trilinear interpolation (float32: exact for 0.25)
    torch.testing.assert_close(back.as_tensor(), torch.full((1, 8, 6, 4), 0.25))


def test_load_transforms_batches_positives_and_negatives(tiny_dataset):
    items = load_decathlon_datalist(tiny_dataset, data_list_key="training")
    originals = {item["image"]: item.get("annotated_slices") for item in items}
    for size in (None, (16, 16, 4)):
        loader = DataLoader(Dataset(items, load_transforms(ALL_KEYS, size=size)), batch_size=4)
        batch = next(iter(loader))
        spatial = (16, 16, 8) if size is None else size
        for key in [*ALL_KEYS, ANNOTATED_MASK]:
            assert tuple(batch[key].shape) == (4, 1, *spatial) and batch[key].dtype == torch.float32, key
        assert batch["label"].tolist() == [1, 1, 0, 0] and batch["label"].dtype == torch.int64
        assert batch[HAS_ANNOTATION].tolist() == [1.0, 1.0, 0.0, 0.0]
        assert "annotated_slices" not in batch
        assert batch["weights"][2:].eq(1).all() and batch["annotation"][2:].eq(0).all()
        for b, image in enumerate(batch["image"].meta["filename_or_obj"]):
            drawn = foreground_slices(batch[ANNOTATED_MASK][b].numpy())
            if originals[image] is None:
                assert drawn == []
                continue
            expected = originals[image] if size is None else list(remap_slices(originals[image], 8, size[2]))
            assert drawn == expected
            # The annotation lives on the annotated slices only and every one of them holds foreground.
            assert foreground_slices(batch["annotation"][b].numpy()) == expected


def test_load_transforms_options(tiny_dataset):
    item = load_decathlon_datalist(tiny_dataset, data_list_key="training")[0]
    out = load_transforms(["image", "annotation"], size="8,8,4", keep_slices=True)(item)
    assert out["annotated_slices"] == list(remap_slices(item["annotated_slices"], 8, 4))
    assert "weights" not in out and "mask" not in out  # paths of volumes not loaded are dropped
    image_only = load_transforms(["image"])(item)
    assert set(image_only) == {"image", "label"}
    with pytest.raises(ValueError, match="must start with 'image'"):
        load_transforms(["annotation", "image"])
    with pytest.raises(ValueError, match=r"\['label'\] are not volume keys"):
        load_transforms(["image", "label"])
    # the raw-scan profile keys reach the chain: 8 slices of 2 mm at 4 mm are 4 slices (MONAI keeps the first
    # slice centre: 7 intervals of 2 mm = 3.5 of 4 mm, rounded up to 4 slices)
    spaced = load_transforms(["image", "annotation"], keep_slices=True, spacing=[1.25, 1.25, 5.0])(item)
    assert spaced["image"].shape[-1] == 4
    assert spaced["annotated_slices"] == sorted({min(3, int(z * 0.5 + 0.5)) for z in item["annotated_slices"]})


def test_load_transforms_from_bundle_style_json(tiny_dataset):
    config = json.loads(json.dumps({"transforms": {
        "_target_": "due_ext.data.transforms.load_transforms", "keys": ["image", "annotation", "weights"],
        "size": [8, 8, 4]}}))
    transforms = ConfigParser(config).get_parsed_content("transforms")
    item = load_decathlon_datalist(tiny_dataset, data_list_key="training")[0]
    assert tuple(transforms(item)["weights"].shape) == (1, 8, 8, 4)


def test_validate_itemd(tiny_dataset):
    folder = tiny_dataset.parent
    items = load_decathlon_datalist(tiny_dataset, data_list_key="training")
    assert ValidateItemd()(items[0]) == items[0]
    assert ValidateItemd()(items[2]) == items[2]  # negative: missing keys allowed

    (folder / "case_000_mask.nii.gz").unlink()
    with pytest.raises(DatalistError, match="case_000_mask.nii.gz: file not found"):
        ValidateItemd()(items[0])
    assert ValidateItemd(keys=["image", "annotation"])(items[0]) == items[0]  # mask not checked
    with pytest.raises(DatalistError, match=r"label 5 is not 0 or 1"):
        ValidateItemd(keys=["image"])(dict(items[2], label=5))

    loaded = load_transforms(["image"])(items[2])
    with pytest.raises(DatalistError, match="put ValidateItemd before LoadImaged"):
        ValidateItemd(keys=["image"])(loaded)
