"""MONAI Deploy application: DUE lesion classification with its Grad-CAM, from NIfTI volumes.

    python deploy/app.py -i INPUT -o OUTPUT -m BUNDLE

- ``INPUT``: one NIfTI volume (``.nii``/``.nii.gz``) or a folder of them (each is processed);
- ``BUNDLE``: the DUE bundle exported by ``python -m due_ext bundle export due --out BUNDLE`` (a folder: the
  model-zoo zip is not a model the SDK can load, and the operator needs ``scripts/`` on ``sys.path``);
- ``OUTPUT``: ``predictions.json`` (``{stem: {"file", "probabilities": {"no_lesion", "lesion"}, "predicted"}}``,
  the format of the bundle's own inference) and ``<stem>_gradcam.nii.gz`` per volume, on the input's grid.
- ``DUE_DEPLOY_PROFILE`` (environment, optional): a profile config of the bundle read after
  ``configs/inference.json``, e.g. ``raw_ct`` for raw CT scans (orientation, spacing, HU window, input size);
  the same keys the bundle's own ``monai.bundle run --config_file "['configs/inference.json', ...]"`` takes.

Every volume goes through the bundle's own preprocessing chain (``deploy#preprocessing``: the chain of
``inference.json`` entered with the loaded array instead of a path), and its Grad-CAM is mapped back through that
chain onto the input's own grid (``scripts.due_ext.data.preprocessing.cam_on_input_grid``), as the bundle's own
inference does.

Graph: :class:`NiftiVolumeLoader` -> :class:`DueBundleInferenceOperator` (the SDK's
``MonaiBundleInferenceOperator``: parses the bundle's ``configs/inference.json`` and ``metadata.json``, builds
``network`` and loads ``models/model.pt``, runs the bundle's ``deploy#preprocessing``) -> :class:`DueResultWriter`.
Everything runs in-process on CPU (or the bundle's ``device``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from holoscan.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Fragment, Image, IOType, Operator, OperatorSpec
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)

CLASS_NAMES = ("no_lesion", "lesion")
#: environment variable naming a profile config of the bundle, read after ``inference`` (e.g. ``raw_ct``)
PROFILE_VARIABLE = "DUE_DEPLOY_PROFILE"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii``/``.nii.gz``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def nifti_inputs(path: str | os.PathLike) -> list[Path]:
    """The volumes to process: ``path`` itself, or the NIfTI files in the folder ``path`` (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.glob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{path}: no NIfTI volume (*.nii, *.nii.gz) to run on")
    return files


class NiftiVolumeLoader(Operator):
    """Emits one volume per call: ``image`` = an SDK ``Image`` of the ``(X, Y, Z)`` float32 array as stored with
    its affine in the metadata (the bundle operator makes a MetaTensor of it, which orientation and spacing need),
    ``meta`` = its path and affine (the SDK's ``NiftiDataLoader`` drops the affine)."""

    def __init__(self, fragment: Fragment, *args: Any, files: list[Path], **kwargs: Any) -> None:
        self.files = list(files)
        self.index = 0
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("image")
        spec.output("meta")

    def compute(self, op_input, op_output, context) -> None:
        path = self.files[self.index]
        self.index += 1
        volume = nib.load(str(path))
        image = np.asarray(volume.dataobj, dtype=np.float32)
        if image.ndim != 3:
            raise ValueError(f"{path}: expected a 3D volume, got shape {image.shape}")
        affine = np.asarray(volume.affine, dtype=np.float64)
        # "spacing" and "original_affine" present: the SDK keeps this metadata as it is (not a DICOM conversion)
        metadata = {"affine": affine, "original_affine": affine.copy(),
                    "spacing": np.asarray(volume.header.get_zooms()[:3]), "spatial_shape": np.asarray(image.shape),
                    "original_channel_dim": "no_channel",
                    "filename_or_obj": str(path)}
        op_output.emit(Image(image, metadata=metadata), "image")
        op_output.emit({"path": str(path), "affine": volume.affine}, "meta")


class DueBundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle operator with DUE's prediction: class probabilities and the Grad-CAM of the predicted
    class, computed by the bundle's own (vendored) ``scripts.due_ext.explain`` code.

    Three things differ from the base class, and why:

    - ``predict``: the network returns logits; the Grad-CAM needs the target layer's features (the layer the
      bundle's evaluator explains) from the same forward pass, so prediction is one call of
      ``gradcam_features`` (the base runs ``inferer(network)`` only).
    - ``_send_output``: the base turns a ``probabilities`` output into names with ``channel_def[int(p)]``,
      which names every soft probability "no lesion"; and an ``image`` output into uint8, which would
      destroy a [0, 1] map. We emit the probabilities and the float32 map as they are.
    - ``post_process``: the Grad-CAM is computed on the network's grid; it goes back through the bundle's
      preprocessing chain onto the input's grid (the base would apply the bundle's postprocessing, which
      describes the network's logits, not the map).
    """

    _eager_network: torch.nn.Module | None = None

    def _network(self) -> torch.nn.Module:
        """The bundle's ``network`` with ``models/model.pt``, built once. Grad-CAM hooks its target layer, so it
        must be the eager module: the SDK hands ``predict`` its generic ``Model`` wrapper of the ``-m`` path, or
        a TorchScript module when ``models/model.ts`` exists."""
        if self._eager_network is None:
            from scripts.due_ext.engines import load_network_weights

            network = self.parser.get_parsed_content("network")
            self._eager_network = load_network_weights(network, self.bundle_path / "models" / "model.pt").eval()
        return self._eager_network

    def _target_layer(self) -> str:
        """The Grad-CAM layer of the bundle's own inference evaluator (``ExplanationEvaluator`` default: layer4)."""
        if self.parser.get("evaluator#target_layer") is not None:
            return str(self.parser.get_parsed_content("evaluator#target_layer"))
        return "layer4"

    def _init_config(self, config_names: list[str]) -> None:
        super()._init_config(config_names)
        # the bundle's metadata describes the network (pred); the Grad-CAM is this application's second output
        self._outputs = {**self._outputs, "cam": {"type": "gradcam", "num_channels": 1}}

    def predict(self, data: Any, *args: Any, **kwargs: Any) -> list[dict[str, torch.Tensor]]:
        from scripts.due_ext.explain.cam import normalized_cam  # the bundle's scripts/ is on sys.path now
        from scripts.due_ext.explain.gradcam import gradcam_features

        # the SDK runs compute() under no_grad; a target layer other than the last before the GAP + linear head
        # needs autograd for dScore/dA, as in the bundle's own evaluator
        with torch.enable_grad():
            found = gradcam_features(self._network(), data.float(), class_index=None, target_layer=self._target_layer())
        cam = normalized_cam(found.features.detach(), found.alpha.detach(), data.shape[2:])
        probabilities = torch.softmax(found.logits.detach().float(), dim=1)
        # a one-element list: the base class keeps only element 0 of a tuple/list and iterates a dict's keys
        return [{"pred": probabilities[0], "cam": cam[0]}]

    def post_process(self, data: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        from scripts.due_ext.data.preprocessing import cam_on_input_grid

        preprocessed = kwargs[self.kw_preprocessed_inputs]["image"]  # (1, X, Y, Z), its applied operations kept
        return {"pred": data["pred"], "cam": cam_on_input_grid(data["cam"], preprocessed, self._preproc).as_tensor()}

    def _send_output(self, value: Any, name: str, metadata: dict, op_output, context) -> None:
        op_output.emit(value.detach().cpu().numpy().astype(np.float32), name)


class DueResultWriter(Operator):
    """Writes ``<stem>_gradcam.nii.gz`` (input affine) and updates ``predictions.json`` in ``output_dir``."""

    def __init__(self, fragment: Fragment, *args: Any, output_dir: Path, **kwargs: Any) -> None:
        self.output_dir = Path(output_dir)
        self.predictions: dict[str, Any] = {}
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pred")
        spec.input("cam")
        spec.input("meta")

    def compute(self, op_input, op_output, context) -> None:
        probabilities = np.asarray(op_input.receive("pred"), dtype=np.float64).reshape(-1)
        cam = np.asarray(op_input.receive("cam"), dtype=np.float32)
        meta = op_input.receive("meta")
        stem = nifti_stem(meta["path"])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(cam, meta["affine"]), str(self.output_dir / f"{stem}_gradcam.nii.gz"))
        self.predictions[stem] = {
            "file": meta["path"],
            "probabilities": {n: float(p) for n, p in zip(CLASS_NAMES, probabilities, strict=True)},
            "predicted": CLASS_NAMES[int(np.argmax(probabilities))],
        }
        # rewritten after every volume (temp file + rename): a crash keeps the results written so far
        tmp = self.output_dir / ".predictions.json.tmp"
        tmp.write_text(json.dumps(self.predictions, indent=2) + "\n")
        os.replace(tmp, self.output_dir / "predictions.json")


class DueDeployApp(Application):
    """DUE classification + Grad-CAM of NIfTI volumes with the exported DUE bundle (MONAI Deploy App SDK)."""

    def compose(self) -> None:
        context: AppContext = Application.init_app_context(self.argv)
        files = nifti_inputs(context.input_path)
        bundle = Path(context.model_path)
        if not (bundle / "configs" / "inference.json").is_file():
            raise FileNotFoundError(
                f"{bundle}: not an exported DUE bundle folder (configs/inference.json missing); "
                "export it with `python -m due_ext bundle export due --out DIR`"
            )
        config_names = ["inference"]
        profile = os.environ.get(PROFILE_VARIABLE)
        if profile:
            if not (bundle / "configs" / f"{profile}.json").is_file():
                raise FileNotFoundError(f"{PROFILE_VARIABLE}={profile}: {bundle}/configs/{profile}.json does not exist")
            config_names.append(profile)
        loader = NiftiVolumeLoader(self, CountCondition(self, len(files)), files=files, name="nifti_loader")
        inference = DueBundleInferenceOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[
                IOMapping("pred", np.ndarray, IOType.IN_MEMORY),
                IOMapping("cam", np.ndarray, IOType.IN_MEMORY),
            ],
            app_context=context,
            bundle_config_names=BundleConfigNames(preproc_name="deploy#preprocessing", config_names=config_names),
            bundle_path=bundle,
            name="due_bundle_inference",
        )
        writer = DueResultWriter(self, output_dir=Path(context.output_path), name="due_writer")
        self.add_flow(loader, inference, {("image", "image")})
        self.add_flow(inference, writer, {("pred", "pred"), ("cam", "cam")})
        self.add_flow(loader, writer, {("meta", "meta")})


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("DUE_DEPLOY_LOG", "INFO"))
    DueDeployApp().run()
