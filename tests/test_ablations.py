"""Ablations of DUE (issue 15 item 4): each variant is a method name with its own soft target and weights, the
loss reading (paper Eq. 2 or the released weighted L1) is a key, the diffusion-variance weights use DUE's mapping,
experiments/ablations.yaml is a valid experiment, and every variant trains one tiny epoch through the bundle."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engines import tiny_batch, tiny_resnet

from due_ext.data import schema
from due_ext.explain.cam import normalized_cam
from due_ext.explain.gradcam import gradcam_features
from due_ext.explain.supervision import CAM_TARGETS, ExplanationSupervision
from due_ext.ops.explanation_loss_reference import TANH_SCALE, explanation_loss_reference

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = ("baseline_plus", "sdf_fill", "diffusion_fill", "due", "due_diffusion_variance")


def _reference_rows(soft_key: str | None, weights_key: str | None, formula: str) -> torch.Tensor:
    """The per-sample loss of the two annotated positives of ``tiny_batch`` computed from the named keys with the
    reference composition (a second, independent path from batch to loss)."""
    network, batch = tiny_resnet(), tiny_batch()
    found = gradcam_features(network, batch["image"], class_index=batch["label"], target_layer="layer4")
    soft, weights = (None if key is None else batch[key][:2, 0] for key in (soft_key, weights_key))
    return explanation_loss_reference(found.features[:2], found.alpha[:2], batch["annotation"][:2, 0], soft,
                                      weights, formula)


@pytest.mark.parametrize("method, soft_key, weights_key, formula", [
    ("sdf_fill", "sdf_fill", None, "baseline_plus"),
    ("diffusion_fill", "interpolation", None, "baseline_plus"),
    ("due", "interpolation", "weights", "due"),
    ("due_diffusion_variance", "interpolation", "diffusion_weights", "due"),
])
def test_each_ablation_supervises_with_its_own_target_and_weights(method, soft_key, weights_key, formula):
    result = ExplanationSupervision(method, target_layer="layer4")(tiny_resnet(), tiny_batch())
    expected = _reference_rows(soft_key, weights_key, formula)
    # fused kernel vs reference on a 16x16x8 map: float32 sums of ~1e3 terms of size <= 1, rounding ~1e-4 relative
    torch.testing.assert_close(result.explanation_loss[:2].detach(), expected.detach(), rtol=1e-4, atol=1e-5)


def test_ablations_differ_only_where_their_inputs_differ():
    """Same batch and network: an ablation whose target differs gives another loss; changing a key an ablation
    does not read does not move it."""
    losses = {m: ExplanationSupervision(m, target_layer="layer4")(tiny_resnet(), tiny_batch()).explanation_loss[:2]
              for m in ("diffusion_fill", "due", "due_diffusion_variance")}
    assert not torch.allclose(losses["diffusion_fill"], losses["due"])
    assert not torch.allclose(losses["due"], losses["due_diffusion_variance"])
    batch = tiny_batch()
    batch["weights"] = torch.zeros_like(batch["weights"])  # diffusion_fill has w = 1 whatever the datalist says
    again = ExplanationSupervision("diffusion_fill", target_layer="layer4")(tiny_resnet(), batch).explanation_loss
    torch.testing.assert_close(again[:2], losses["diffusion_fill"], rtol=0, atol=0)


def _hand_eq2(batch, weights_key: str) -> torch.Tensor:
    """Eq. 2 written out: unweighted binary term on the drawn foreground + mean |S - w I|."""
    network = tiny_resnet()
    found = gradcam_features(network, batch["image"], class_index=batch["label"], target_layer="layer4")
    cam = normalized_cam(found.features[:2], found.alpha[:2], batch["image"].shape[2:]).double()
    m = batch["annotation"][:2, 0].double()
    target = batch[weights_key][:2, 0].double() * batch["interpolation"][:2, 0].double()
    foreground = (m != 0).double()
    binary = (foreground * (torch.tanh(TANH_SCALE * (cam - 0.5)) - m).abs()).flatten(1).sum(1)
    binary = binary / foreground.flatten(1).sum(1).clamp_min(1)
    return binary + (cam - target).abs().flatten(1).mean(1)


@pytest.mark.parametrize("method, weights_key", [("due", "weights"), ("due_diffusion_variance", "diffusion_weights")])
def test_paper_eq2_reading_is_the_unweighted_loss_of_the_weighted_target(method, weights_key):
    batch = tiny_batch()
    eq2 = ExplanationSupervision(method, target_layer="layer4", loss_reading="paper_eq2")(tiny_resnet(), batch)
    # float64 hand formula vs the float32 fused op: ~1e3 float32 terms, 1e-4 relative covers their rounding
    torch.testing.assert_close(eq2.explanation_loss[:2].double().detach(), _hand_eq2(batch, weights_key),
                               rtol=1e-4, atol=1e-5)
    released = ExplanationSupervision(method, target_layer="layer4")(tiny_resnet(), batch)
    assert not torch.allclose(eq2.explanation_loss[:2], released.explanation_loss[:2])  # random w: they differ
    eq2.loss.backward()  # and it trains


def test_the_readings_agree_when_every_weight_is_one():
    batch = tiny_batch()
    batch["weights"] = torch.ones_like(batch["weights"])
    rows = [ExplanationSupervision("due", target_layer="layer4", loss_reading=r)(tiny_resnet(), batch)
            .explanation_loss[:2].detach() for r in ("weighted_l1", "paper_eq2")]
    torch.testing.assert_close(rows[0], rows[1], rtol=1e-5, atol=1e-6)


def test_loss_reading_is_checked_and_only_weighted_methods_have_one():
    with pytest.raises(ValueError, match="loss_reading 'eq2' is unknown"):
        ExplanationSupervision("due", loss_reading="eq2")
    batch = tiny_batch()
    rows = [ExplanationSupervision("sdf_fill", target_layer="layer4", loss_reading=r)(tiny_resnet(), batch)
            .explanation_loss for r in ("weighted_l1", "paper_eq2")]
    torch.testing.assert_close(rows[0], rows[1], rtol=0, atol=0)  # w = 1: nothing to read differently
    assert {t.formula for t in CAM_TARGETS.values()} <= {"due", "baseline_plus", "gradia", "haics", "res_g"}


def test_diffusion_weights_map_the_interpolators_variance_like_due(tiny_dataset, tmp_path):
    from due_ext.bundles import add_diffusion_weights
    from due_ext.data.datalist import read_datalist
    from due_ext.data.nifti import read_nifti, write_nifti
    from due_ext.uncertainty.weights import uncertainty_weights

    # the "interpolator's datalist": the fixture's variance replaced by a diffusion-like one
    interpolated = json.loads(tiny_dataset.read_text())
    rng = np.random.default_rng(0)
    for item in interpolated["training"] + interpolated["validation"]:
        if item["label"] == 1:
            variance, affine = read_nifti(tiny_dataset.parent / item["variance"])
            noisy = (variance * rng.uniform(0.5, 1.5, variance.shape)).astype(np.float32)
            write_nifti(tiny_dataset.parent / f"diffusion_{item['variance']}", noisy, affine)
            item["variance"] = f"diffusion_{item['variance']}"
    (tiny_dataset.parent / "interpolated.json").write_text(json.dumps(interpolated))
    out = add_diffusion_weights(tiny_dataset, tiny_dataset.parent / "interpolated.json", tmp_path / "step",
                                ("training", "validation"), normalization="volume")
    payload = read_datalist(out)
    positives = [item for item in payload["training"] + payload["validation"] if item["label"] == 1]
    assert len(positives) == 3
    for item in positives:
        source = next(i for i in interpolated["training"] + interpolated["validation"]
                      if i["label"] == 1 and Path(i["annotation"]).name == Path(item["annotation"]).name)
        variance, _ = read_nifti(tiny_dataset.parent / source["variance"])
        expected = uncertainty_weights(variance, item["annotated_slices"], normalization="volume")
        got, _ = read_nifti(item["diffusion_weights"])
        np.testing.assert_array_equal(got, expected)
        assert item["weights"] == str((tiny_dataset.parent / Path(item["weights"]).name).resolve())  # DUE's kept
    tests = [item for item in payload["test"] if item["label"] == 1]  # a section not asked for: left as it was
    assert tests and all(not item["diffusion_weights"].startswith(str(tmp_path / "step")) for item in tests)


def test_diffusion_weights_need_the_interpolators_variance(tiny_dataset, tmp_path):
    from due_ext.bundles import add_diffusion_weights

    payload = json.loads(tiny_dataset.read_text())
    for item in payload["training"]:
        item.pop("variance", None)
    (tiny_dataset.parent / "no_variance.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="no_variance.json: no diffusion variance for training_case_000"):
        add_diffusion_weights(tiny_dataset, tiny_dataset.parent / "no_variance.json", tmp_path / "step",
                              ("training",))


def test_every_method_is_prepared_from_one_derived_datalist(tmp_path, monkeypatch):
    """An experiment prepares its data once for its first derived method: that datalist must serve them all."""
    import due_ext.bundles as bundles

    calls = []
    monkeypatch.setattr(bundles, "derive_uncertainty_keys", lambda d, s, n: calls.append(("np", n)) or "np.json")

    def fake_diffusion(uncertain, interpolated, step, sections, normalization):
        calls.append(("diffusion", Path(step).name))
        return str(Path(step) / "datalist.json")

    monkeypatch.setattr(bundles, "add_diffusion_weights", fake_diffusion)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "a", "label": 1, "annotation": "m",
                                                  "annotated_slices": [0]}]}))
    monkeypatch.setattr(bundles, "derived_folder", lambda d, s: tmp_path / "derived")
    for method in ("diffusion_fill", "due", "due_diffusion_variance"):
        assert Path(bundles.prepared_datalist(str(datalist), method)).parent.name == "diffusion-weights"
    assert bundles.prepared_datalist(str(datalist), "sdf_fill") == str(datalist)  # classical: nothing derived
    bundles.prepared_datalist(str(datalist), "due", normalization="volume")
    assert calls[-2:] == [("np", "volume"), ("diffusion", "diffusion-weights-volume")]
    with pytest.raises(ValueError, match=r"needs \['diffusion_weights', 'interpolation'\]"):
        bundles.prepared_datalist(str(datalist), "due_diffusion_variance", derive=False)


def test_ablations_experiment_names_the_five_variants():
    from due_ext.experiments.config import load_experiment

    ablations = load_experiment(REPO / "experiments" / "ablations.yaml")
    assert [g["method"] for g in ablations.grid] == [list(ABLATIONS)]
    eq2 = load_experiment(REPO / "experiments" / "ablations_eq2.yaml")
    assert eq2.overrides["loss_reading"] == "paper_eq2"
    assert sorted({c.method for c in eq2.cells()}) == ["due", "due_diffusion_variance"]
    assert eq2.dataset == ablations.dataset and {k: v for k, v in eq2.overrides.items() if k != "loss_reading"} \
        == ablations.overrides  # same data, backbone and budget


@pytest.fixture(scope="module")
def bundle_cache(tmp_path_factory):
    """One cache for the module: the phantom set and its derived keys are made once for all variants."""
    return tmp_path_factory.mktemp("ablation_bundle")


@pytest.mark.parametrize("method, reading", [*((m, "weighted_l1") for m in ABLATIONS), ("due", "paper_eq2")])
def test_each_ablation_trains_one_tiny_epoch_through_the_bundle(bundle_cache, method, reading):
    root = bundle_cache / f"{method}-{reading}"
    root.mkdir()
    env = dict(os.environ, DUE_EXT_CACHE=str(bundle_cache / "cache"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                          str(REPO / "bundles" / "due" / "train.json"), "--bundle_root", str(root),
                          "--demo_dataset", "phantom", "--method", method, "--loss_reading", reading,
                          "--max_epochs", "1", "--block_inplanes", "[4, 8, 8, 8]"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    checkpoint = torch.load(root / "eval" / method / "checkpoints" / "checkpoint_epoch=1.pt", weights_only=True)
    assert {"network", "optimizer", "lr_scheduler", "validator"} <= set(checkpoint)
    assert (root / "eval" / method / "test" / "metrics.json").is_file()
    if method in ("diffusion_fill", "due", "due_diffusion_variance"):
        derived = sorted((bundle_cache / "cache" / "datasets").glob("phantom-*/derived-*/diffusion-weights/"
                                                                      "datalist.json"))
        assert len(derived) == 1
        positives = [i for i in json.loads(derived[0].read_text())["training"] if i["label"] == 1]
        assert positives and all({"interpolation", "weights", schema.DIFFUSION_WEIGHTS} <= set(i) for i in positives)
