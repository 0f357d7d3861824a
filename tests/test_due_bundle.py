"""The DUE bundle through monai.bundle, tiny: train, evaluate, inference, two-process training, and the
network's input/output check. Runs on the phantom demo set with a narrow network."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "due"
TINY = ["--demo_dataset", "phantom", "--method", "baseline_plus", "--max_epochs", "1",
        "--block_inplanes", "[4, 8, 8, 8]"]


def _bundle(args, tmp, *, runner=(sys.executable, "-m", "monai.bundle"), timeout=600):
    env = dict(os.environ, DUE_EXT_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    run = subprocess.run([*runner, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("due_bundle")
    root = tmp / "bundle"
    root.mkdir()
    _bundle(["run", "--config_file", str(BUNDLE / "train.json"), "--bundle_root", str(root), *TINY], tmp)
    return tmp, root


def _assert_test_report(test_dir: Path) -> None:
    metrics = json.loads((test_dir / "metrics.json").read_text())
    assert {"roc_auc", "pr_auc", "accuracy"} <= set(metrics["prediction"])
    assert metrics["n_positives"] > 0 and "iou" in metrics["explanation"]
    for figure in ("gradcam_overlays.png", "explanation_vs_threshold.png", "metrics.csv"):
        assert (test_dir / figure).is_file()


def test_train_writes_best_model_checkpoint_and_test_report(trained):
    import torch

    _, root = trained
    assert (root / "models" / "baseline_plus" / "model.pt").is_file()  # one folder per method (run name)
    checkpoint = root / "eval" / "baseline_plus" / "checkpoints" / "checkpoint_epoch=1.pt"
    validator = torch.load(checkpoint, weights_only=True)["validator"]
    # the model selection is in the checkpoint, so a resumed run does not forget its best epoch
    assert validator["best_metric_epoch"] == 1 and 0.0 <= validator["best_metric"] <= 1.0
    _assert_test_report(root / "eval" / "baseline_plus" / "test")


def test_evaluate_writes_metrics_and_figures(trained):
    tmp, root = trained
    test_dir = root / "eval" / "baseline_plus" / "test"
    shutil.rmtree(test_dir)
    configs = json.dumps([str(BUNDLE / "train.json"), str(BUNDLE / "evaluate.json")])
    run = _bundle(["run", "--config_file", configs, "--bundle_root", str(root), *TINY], tmp)
    assert "ExplanationTrainer - INFO" not in run.stdout + run.stderr  # evaluation only: no training
    _assert_test_report(test_dir)


def test_evaluate_loads_the_model_of_its_own_method(trained):
    """Evaluating a method that was not trained fails loudly instead of scoring another method's model."""
    tmp, root = trained
    configs = json.dumps([str(BUNDLE / "train.json"), str(BUNDLE / "evaluate.json")])
    args = [a if a != "baseline_plus" else "gradia" for a in TINY]
    env = dict(os.environ, DUE_EXT_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root",
                          str(root), *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert run.returncode != 0 and "models/gradia/model.pt: model weights not found" in run.stderr
    assert not (root / "eval" / "gradia").exists()


def _parsed_trainer(root: Path, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "train.json"))
    # no data and no handlers: only the trainer's own settings are looked at
    parser.update({"bundle_root": str(root), "block_inplanes": [4, 8, 8, 8], "device": "$torch.device('cpu')",
                   "train#trainer#train_data_loader": "$[{}]", "train#trainer#train_handlers": [], **overrides})
    return parser.get_parsed_content("train#trainer")


def test_amp_and_gradient_clipping_keys_reach_the_trainer(tmp_path):
    import torch

    default = _parsed_trainer(tmp_path)
    assert default.amp_dtype is None and default.grad_clip_norm is None  # off unless asked for
    trainer = _parsed_trainer(tmp_path, amp="bf16", grad_clip_norm=5.0)
    assert trainer.amp_dtype is torch.bfloat16 and trainer.grad_clip_norm == 5.0


def test_inference_writes_probabilities_and_gradcam(trained):
    tmp, root = trained
    images = sorted((tmp / "cache" / "datasets").glob("phantom-*/images/test_*.nii.gz"))[:2]
    inputs = tmp / "inputs"
    inputs.mkdir()
    for image in images:
        shutil.copy(image, inputs / image.name)
    _bundle(["run", "--config_file", str(BUNDLE / "inference.json"), "--bundle_root", str(root),
             "--input_dir", str(inputs), "--run_name", "baseline_plus", "--block_inplanes", "[4, 8, 8, 8]"], tmp)
    predictions = json.loads((root / "eval" / "inference" / "predictions.json").read_text())
    assert len(predictions) == 2
    for entry in predictions.values():
        assert sum(entry["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert (root / "eval" / "inference" / (Path(entry["file"]).name.split(".")[0] + "_gradcam.nii.gz")).is_file()


def test_inference_fails_loudly_without_weights(tmp_path):
    env = dict(os.environ, DUE_EXT_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "inference.json"),
                          "--bundle_root", str(tmp_path)], capture_output=True, text=True, cwd=REPO, env=env)
    assert run.returncode != 0 and "models/due/model.pt: model weights not found" in run.stderr


def test_network_input_output_and_metadata(trained):
    tmp, _ = trained
    _bundle(["verify_net_in_out", "--net_id", "network_def", "--meta_file", str(BUNDLE / "metadata.json"),
             "--config_file", str(BUNDLE / "train.json"), "--block_inplanes", "[4, 8, 8, 8]"], tmp)


def test_two_process_training_on_cpu(tmp_path):
    root = tmp_path / "bundle"
    root.mkdir()
    configs = json.dumps([str(BUNDLE / "train.json"), str(BUNDLE / "multi_gpu_train.json")])
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2")
    _bundle(["-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(root), *TINY], tmp_path,
            runner=torchrun)
    assert (root / "models" / "baseline_plus" / "model.pt").is_file()
    import torch

    state = torch.load(root / "eval" / "baseline_plus" / "checkpoints" / "checkpoint_epoch=1.pt", weights_only=True)
    assert not any(key.startswith("module.") for key in state["network"])  # resumable without DDP too
    _assert_test_report(root / "eval" / "baseline_plus" / "test")  # the same report as one process writes


def test_due_method_derives_interpolation_and_weights_then_trains(tmp_path):
    root = tmp_path / "bundle"
    root.mkdir()
    args = [a if a != "baseline_plus" else "due" for a in TINY]
    _bundle(["run", "--config_file", str(BUNDLE / "train.json"), "--bundle_root", str(root), *args], tmp_path)
    derived = sorted((tmp_path / "cache" / "datasets").glob("phantom-*/derived-*/uncertainty/datalist.json"))
    assert len(derived) == 1
    positives = [i for i in json.loads(derived[0].read_text())["training"] if i["label"] == 1]
    assert positives and all({"interpolation", "weights", "variance"} <= set(item) for item in positives)
    assert (root / "eval" / "due" / "checkpoints" / "checkpoint_epoch=1.pt").is_file()


def test_derived_folder_key_changes_with_sections_and_derivation_version(tmp_path, monkeypatch):
    from due_ext import bundles

    datalist = tmp_path / "datalist.json"
    folder = bundles.derived_folder(datalist, ("training", "validation"))
    assert folder.parent == tmp_path and folder.name.startswith("derived-")
    assert bundles.derived_folder(datalist, ("validation", "training")) == folder  # order does not matter
    assert bundles.derived_folder(datalist, ("training",)) != folder
    monkeypatch.setattr(bundles, "DERIVATION_VERSION", bundles.DERIVATION_VERSION + 1)
    assert bundles.derived_folder(datalist, ("training", "validation")) != folder  # older derivations not reused


def test_prepared_datalist_names_missing_keys_without_derivation(tmp_path):
    from due_ext.bundles import prepared_datalist
    from due_ext.data.datalist import write_datalist

    datalist = tmp_path / "datalist.json"
    write_datalist(datalist, {"training": [{"image": "a.nii.gz", "label": 1, "annotation": "m.nii.gz",
                                            "annotated_slices": [0, 3]}]})
    assert prepared_datalist(str(datalist), "baseline_plus") == str(datalist)
    with pytest.raises(ValueError, match=r"\['interpolation', 'weights'\]"):
        prepared_datalist(str(datalist), "due", derive=False)


def test_exbl_is_one_override_away(tmp_path):
    """eXBL needs its exemplar selector on the trainer: the config attaches it for --method exbl."""
    root = tmp_path / "bundle"
    root.mkdir()
    args = [a if a != "baseline_plus" else "exbl" for a in TINY]
    _bundle(["run", "--config_file", str(BUNDLE / "train.json"), "--bundle_root", str(root), *args], tmp_path)
    assert (root / "eval" / "exbl" / "checkpoints" / "checkpoint_epoch=1.pt").is_file()


def test_weight_mappings_share_one_interpolation(tmp_path, monkeypatch):
    """The interpolation does not depend on how the variance is mapped to weights: a second mapping reuses it."""
    import due_ext.bundles as bundles

    calls = []

    def fake_run(name, config, component, overrides):
        calls.append((name, overrides.get("normalization")))
        out = Path(overrides["output_dir"]) / "datalist.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("{}")
        return str(out)

    monkeypatch.setattr(bundles, "_run_bundle_component", fake_run)
    datalist = tmp_path / "datalist.json"
    datalist.write_text("{}")
    block = Path(bundles.derive_uncertainty_keys(str(datalist)))
    volume = Path(bundles.derive_uncertainty_keys(str(datalist), normalization="volume"))
    assert bundles.derive_uncertainty_keys(str(datalist), normalization="volume") == str(volume)  # reused
    assert calls == [("interpolator", None), ("uncertainty", "block"), ("uncertainty", "volume")]
    assert block.parent.name == "uncertainty" and volume.parent.name == "uncertainty-volume"
    assert block.parent.parent == volume.parent.parent
