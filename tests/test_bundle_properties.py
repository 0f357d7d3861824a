"""MONAI's bundle conventions, checked with MONAI's own functions.

- every config (and the config combinations the docs use) passes ``create_workflow(...).check_properties()``
  with nothing missing, for the workflow type MONAI Label, MONAI FL and the model zoo's tests use;
- ``dataset_dir`` is the folder the data is read from: ``<dataset_dir>/datalist.json`` by default, relative
  paths resolved against the datalist's own folder, and no demo data is built when it is given;
- the exported bundles' metadata and networks pass ``verify_metadata``, ``verify_net_in_out`` and (DUE)
  ``ckpt_export``, the calls the model zoo's ``ci/verify_bundle.py`` makes.

``check_properties`` reads every property, so it builds every engine, dataset and network of the config: the
overrides shrink them (tiny datasets, tiny networks) without changing what is wired to what.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_helpers import REPO, random_due_weights
from monai.bundle import ConfigParser, create_workflow, verify_net_in_out

import due_ext.bundles
from due_ext.data.builders import build_dataset
from due_ext.data.nifti import write_nifti
from due_ext.export import export_bundle
from due_ext.export.metadata import STORED_SCHEMA

pytestmark = pytest.mark.usefixtures("one_thread")

BUNDLES = REPO / "bundles"
TINY_RESNET = {"block_inplanes": [4, 8, 8, 8], "batch_size": 2}
TINY_INTERPOLATOR_NET = {"crop_size": 8, "network_def#channels": [8, 16], "network_def#norm_num_groups": 4,
                         "network_def#num_head_channels": 8}
TINY_UNCERTAINTY = {
    "crop_size": 8,
    "interpolator_def#channels": [8, 16], "interpolator_def#norm_num_groups": 4,
    "interpolator_def#num_head_channels": 8,
    "target_sampler#steps": 1, "target_sampler#repeats": 2, "every_k": [2], "n_shapes": 0, "n_val_shapes": 0,
    "network_def#features": [8, 8], "network_def#latent_dim": 4, "network_def#embed_dim": 8,
}


@pytest.fixture(autouse=True)
def _no_demo_data(monkeypatch):
    """Every workflow here gets its data through ``dataset_dir`` or ``datalist``: building a demo set is a bug."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"demo_datalist{args} was called although the data was given")

    monkeypatch.setattr(due_ext.bundles, "demo_datalist", refuse)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """Folder of a tiny phantom set (``datalist.json`` with relative paths) for the two upstream bundles."""
    folder = tmp_path_factory.mktemp("phantom")
    build_dataset("phantom", folder, n_pos=3, n_neg=3, size="16,16,12", every_k=2, seed=0)
    return folder


@pytest.fixture(scope="module")
def tiny_interpolator(tmp_path_factory) -> Path:
    """Weights of the tiny interpolator of :data:`TINY_UNCERTAINTY` (random init, seeded)."""
    from due_ext.interp.diffusion.model import SliceInterpolationUNet

    torch.manual_seed(0)
    net = SliceInterpolationUNet(channels=(8, 16), norm_num_groups=4, num_head_channels=8, crop_size=8,
                                 prior_channels=2)  # as the uncertainty bundle's interpolator_def
    path = tmp_path_factory.mktemp("interpolator") / "model.pt"
    torch.save(net.state_dict(), path)
    return path


def _workflow(config: str | list[str], workflow_type: str, bundle: str, **override):
    files = [str(BUNDLES / bundle / name) for name in ([config] if isinstance(config, str) else config)]
    return create_workflow(config_file=files, workflow_type=workflow_type, logging_file=False,
                           meta_file=str(BUNDLES / bundle / "metadata.json"), device="$torch.device('cpu')",
                           **override)


def _assert_complete(workflow) -> None:
    missing = workflow.check_properties()
    assert missing == [], f"missing or wrongly wired properties: {missing}"


@pytest.mark.parametrize("configs", [["train.json"], ["train.json", "evaluate.json"], ["train.json", "paper.json"]])
def test_due_train_properties(tiny_dataset, tmp_path, configs):
    overrides = dict(TINY_RESNET)
    if "evaluate.json" in configs:  # loads weights of the default network
        overrides.pop("block_inplanes")
        (tmp_path / "weights").mkdir()
        overrides["ckpt_dir"] = str(random_due_weights(tmp_path / "weights" / "model.pt").parent)
    workflow = _workflow(configs, "train", "due", bundle_root=str(tmp_path / "bundle"),
                         dataset_dir=str(tiny_dataset.parent), **overrides)
    _assert_complete(workflow)
    # dataset_dir alone chose the data: its datalist, its files
    assert workflow.dataset_dir == str(tiny_dataset.parent)
    assert all(item["image"].startswith(str(tiny_dataset.parent)) for item in workflow.train_dataset_data)
    assert workflow.train_inferer is workflow.trainer.inferer
    assert workflow.val_inferer is workflow.evaluator.inferer


def test_due_multi_gpu_train_properties(tiny_dataset, tmp_path, monkeypatch):
    import torch.distributed as dist

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29517"}.items():
        monkeypatch.setenv(key, value)
    try:
        workflow = _workflow(["train.json", "multi_gpu_train.json"], "train", "due",
                             bundle_root=str(tmp_path / "bundle"), dataset_dir=str(tiny_dataset.parent), **TINY_RESNET)
        _assert_complete(workflow)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_due_inference_properties(tmp_path):
    inputs = tmp_path / "volumes"
    write_nifti(inputs / "case.nii.gz", torch.rand(16, 16, 8).numpy(), torch.eye(4).numpy())
    (tmp_path / "weights").mkdir()
    random_due_weights(tmp_path / "weights" / "model.pt")
    workflow = _workflow("inference.json", "inference", "due", bundle_root=str(tmp_path / "bundle"),
                         ckpt_dir=str(tmp_path / "weights"), dataset_dir=str(inputs))
    _assert_complete(workflow)
    # --dataset_dir is the inference input folder (--input_dir, its older name, defaults to it)
    assert [item["image"] for item in workflow.dataset_data] == [str(inputs / "case.nii.gz")]
    assert workflow.inferer is workflow.evaluator.inferer


def test_interpolator_train_properties(phantom, tmp_path):
    workflow = _workflow("train.json", "train", "interpolator", bundle_root=str(tmp_path / "bundle"),
                         dataset_dir=str(phantom), samples_per_epoch=4, val_samples=4, **TINY_INTERPOLATOR_NET)
    _assert_complete(workflow)
    assert workflow.train_inferer is workflow.trainer.inferer


def test_interpolator_inference_properties(phantom, tmp_path):
    workflow = _workflow("inference.json", "inference", "interpolator", dataset_dir=str(phantom),
                         output_dir=str(tmp_path / "out"))
    _assert_complete(workflow)
    # the sampler settings are the inferer, and the run uses them
    assert workflow.inferer is workflow.evaluator.settings and workflow.inferer.steps == 10
    expected = sum(len(v) for k, v in json.loads((phantom / "datalist.json").read_text()).items()
                   if k in ("training", "validation", "test"))
    assert len(workflow.dataset) == expected
    assert all(os.path.isabs(item["image"]) and item["image"].startswith(str(phantom))
               for item in workflow.dataset.data)


def test_uncertainty_train_properties(phantom, tiny_interpolator, tmp_path):
    workflow = _workflow("train.json", "train", "uncertainty", bundle_root=str(tmp_path / "bundle"),
                         dataset_dir=str(phantom), interpolator_weights=str(tiny_interpolator), **TINY_UNCERTAINTY)
    _assert_complete(workflow)
    assert len(workflow.train_dataset) > 0


def test_uncertainty_inference_properties(phantom, tmp_path):
    # the uncertainty bundle reads the interpolator's output, <dataset_dir>/interpolator/datalist.json
    derived = phantom / "interpolator"
    derived.mkdir(exist_ok=True)
    payload = json.loads((phantom / "datalist.json").read_text())
    for section in ("training", "validation", "test"):
        for item in payload[section]:
            item["image"] = str(phantom / item["image"])
    (derived / "datalist.json").write_text(json.dumps(payload))
    workflow = _workflow("inference.json", "inference", "uncertainty", dataset_dir=str(phantom),
                         output_dir=str(tmp_path / "out"))
    _assert_complete(workflow)
    assert workflow.parser.get_parsed_content("datalist") == str(derived / "datalist.json")


# --- network_data_format against the networks, as the model zoo's verify_data_shape checks it -----------------


def _fake_tensor(entry: dict) -> torch.Tensor:
    """What MONAI's verify_net_in_out feeds for a metadata input: ``torch.rand`` of the declared dtype, batch 1,
    ``num_channels`` then ``spatial_shape`` ("*" -> 1); a vector input (``spatial_shape`` []) is ``(1,)``."""
    dtype = getattr(torch, entry["dtype"])
    shape = (1, entry["num_channels"], *(1 if s == "*" else s for s in entry["spatial_shape"])) \
        if entry["spatial_shape"] else (1,)
    if dtype.is_floating_point:
        return torch.rand(shape, dtype=dtype)
    low, high = entry["value_range"]
    return torch.randint(low, high + 1, shape, dtype=dtype)


def _metadata(bundle: str) -> dict:
    return json.loads((BUNDLES / bundle / "metadata.json").read_text())


def test_interpolator_metadata_matches_its_network():
    fmt = _metadata("interpolator")["network_data_format"]
    extra = {name: _fake_tensor(entry) for name, entry in fmt["inputs"].items() if name != "image"}
    # MONAI's own check (torch.rand of the declared dtype: a uint8 "image" fails here), with the denoiser's other
    # inputs passed the way verify_net_in_out allows
    verify_net_in_out(net_id="network_def", meta_file=str(BUNDLES / "interpolator" / "metadata.json"),
                      config_file=str(BUNDLES / "interpolator" / "inference.json"), device="cpu",
                      extra_forward_args=extra)
    assert fmt["inputs"]["timesteps"]["value_range"] == [0, 999]  # the trained schedule has 1000 steps


def test_uncertainty_metadata_matches_its_network():
    fmt = _metadata("uncertainty")["network_data_format"]
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "uncertainty" / "inference.json"))
    network = parser.get_parsed_content("network_def").eval()
    inputs = {name: _fake_tensor(entry) for name, entry in fmt["inputs"].items()}
    inputs["gaps"] = torch.ones(1, dtype=torch.int64)  # one missing slice: G = 1 channel
    with torch.no_grad():
        out = network(inputs.pop("image"), inputs["upper"], inputs["gaps"])
    pred = fmt["outputs"]["pred"]
    # verify_net_in_out's output checks, on the tensor the metadata names (its output is a dataclass)
    assert out.log_var.shape[1] == pred["num_channels"]
    assert out.log_var.dtype == getattr(torch, pred["dtype"])
    assert tuple(out.log_var.shape[2:]) == tuple(pred["spatial_shape"])


@pytest.mark.parametrize("bundle", ["interpolator", "uncertainty"])
def test_declared_input_dtypes_are_ones_monai_can_fake(bundle):
    # verify_net_in_out draws torch.rand(dtype=image dtype): integer dtypes (the uint8 of metadata 0.2.0) fail
    image = _metadata(bundle)["network_data_format"]["inputs"]["image"]
    torch.rand(1, dtype=getattr(torch, image["dtype"]))


def test_due_export_passes_the_model_zoo_calls(tmp_path):
    """The calls of the zoo's ``ci/verify_bundle.py -m full`` on the exported DUE bundle, from its folder:
    ``verify_metadata``, ``verify_net_in_out`` and ``ckpt_export`` (TorchScript, then loaded)."""
    bundle = tmp_path / "due"
    export_bundle("due", bundle, model=random_due_weights(tmp_path / "weights.pt"))
    code = f"""
import sys, torch
sys.path.insert(0, {str(bundle)!r})
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
meta, config = 'configs/metadata.json', 'configs/inference.json'
verify_metadata(meta_file=meta, filepath={str(STORED_SCHEMA)!r})
verify_net_in_out(net_id='network_def', meta_file=meta, config_file=config, bundle_root='.', device='cpu')
ckpt_export(net_id='network_def', filepath='models/verify_model.ts', ckpt_file='models/model.pt', meta_file=meta,
            config_file=config, bundle_root='.')
torch.jit.load('models/verify_model.ts')
print('zoo calls passed')
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=bundle, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "zoo calls passed" in result.stdout
