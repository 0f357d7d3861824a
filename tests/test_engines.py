"""The explanation-supervised trainer and evaluator on tiny in-memory batches: every method trains, its
explanation loss is non-zero exactly for annotated positives, gradients reach the backbone, NaN stops."""

import pytest
import torch
from monai.networks.nets import ResNet

from due_ext.data import schema
from due_ext.engines import (
    ClassificationMetric,
    ExplanationEvaluator,
    ExplanationMetric,
    ExplanationTrainer,
    NonFiniteLossError,
)
from due_ext.explain.exemplars import ExemplarSelector, select_exemplars
from due_ext.explain.supervision import METHODS, ExplanationSupervision

SIZE = (16, 16, 8)


def tiny_resnet(seed: int = 0) -> ResNet:
    """layer4 is 2x2x1 on a 16x16x8 input: a 1x1x1 map would upsample to a constant CAM, whose min-max
    normalisation is degenerate (its gradient is pure rounding noise amplified by 1/eps)."""
    torch.manual_seed(seed)
    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[4, 8, 8, 8], spatial_dims=3,
                  n_input_channels=1, num_classes=2, conv1_t_stride=1, no_max_pool=True, shortcut_type="B",
                  bias_downsample=False)


def tiny_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two annotated positives (a bright cube), two negatives; every key the methods read."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand((4, 1, *SIZE), generator=g) * 0.2
    mask = torch.zeros((4, 1, *SIZE))
    mask[:2, :, 4:10, 5:11, 2:6] = 1.0
    image = image + mask
    annotated_mask = torch.zeros_like(mask)
    annotated_mask[:2, ..., [2, 5]] = 1.0
    return {
        schema.IMAGE: image,
        schema.LABEL: torch.tensor([1, 1, 0, 0]),
        schema.ANNOTATION: mask * annotated_mask,
        "annotated_mask": annotated_mask,
        schema.INTERPOLATION: mask * 0.9,
        schema.WEIGHTS: torch.rand((4, 1, *SIZE), generator=g),
        "nearest_fill": mask.clone(),
        "sdf_fill": mask.clone(),
        schema.DIFFUSION_WEIGHTS: torch.rand((4, 1, *SIZE), generator=g),
        schema.MASK: mask,
        "has_annotation": torch.tensor([1.0, 1.0, 0.0, 0.0]),
    }


@pytest.mark.parametrize("method", METHODS)
def test_each_method_supervises_only_annotated_positives(method):
    network = tiny_resnet()
    supervision = ExplanationSupervision(method)
    if method == "exbl":
        supervision.exemplars = select_exemplars(network, [tiny_batch(1)], "cpu")
    result = supervision(network, tiny_batch())
    assert result.logits.shape == (4, 2)
    assert result.supervised.tolist() == [True, True, False, False]
    per_sample = result.explanation_loss.detach()
    if method == "baseline":
        assert torch.all(per_sample == 0)
    else:
        assert torch.all(per_sample[:2] > 0) and torch.all(per_sample[2:] == 0)
    result.loss.backward()
    conv1_grad = network.conv1.weight.grad
    assert conv1_grad is not None and conv1_grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["due", "gradia", "rrr"])
def test_explanation_gradient_reaches_the_backbone(method):
    network = tiny_resnet()
    supervision = ExplanationSupervision(method)
    result = supervision(network, tiny_batch())
    grads = torch.autograd.grad(result.explanation_loss.sum(), network.layer1[0].conv1.weight)
    assert grads[0].abs().sum() > 0


def test_exbl_exemplars_are_the_best_and_worst_activation_recall():
    network = tiny_resnet()
    batch = tiny_batch()
    exemplars = select_exemplars(network, [batch], "cpu")
    assert exemplars.shape == (2, 1, *SIZE)
    from due_ext.explain.gradcam import grad_cam
    from due_ext.metrics.explanation import activation_recall

    network.eval()
    cams = grad_cam(network, batch[schema.IMAGE][:2], class_index=batch[schema.LABEL][:2])[:, 0]
    recall = activation_recall(cams, batch["nearest_fill"][:2, 0])
    products = batch[schema.IMAGE][:2] * cams.unsqueeze(1)
    torch.testing.assert_close(exemplars[0], products[int(recall.argmax())])
    torch.testing.assert_close(exemplars[1], products[int(recall.argmin())])
    with pytest.raises(RuntimeError, match="exemplars"):
        ExplanationSupervision("exbl")(network, batch)


def test_unknown_method_and_missing_keys_are_named():
    with pytest.raises(ValueError, match="unknown"):
        ExplanationSupervision("gradcam++")
    batch = tiny_batch()
    del batch[schema.WEIGHTS]
    with pytest.raises(KeyError, match="weights"):
        ExplanationSupervision("due")(tiny_resnet(), batch)


def _train(method: str, batches, max_epochs: int = 1, network=None, optimizer=torch.optim.Adam, lr=1e-3):
    network = network or tiny_resnet()
    trainer = ExplanationTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=batches, network=network,
        optimizer=optimizer(network.parameters(), lr), supervision=ExplanationSupervision(method))
    if method == "exbl":
        ExemplarSelector(batches).attach(trainer)
    trainer.run()
    return trainer, network


@pytest.mark.parametrize("method", METHODS)
def test_trainer_runs_two_iterations_per_method(method):
    before = {k: v.clone() for k, v in tiny_resnet().state_dict().items()}
    trainer, network = _train(method, [tiny_batch(0), tiny_batch(1)])
    assert trainer.state.iteration == 2
    out = trainer.state.output
    assert out["supervised"] == 2 and out["pred"].shape == (4, 2)
    assert (out["explanation_loss"] > 0) == (method != "baseline")
    assert not torch.equal(before["conv1.weight"], network.state_dict()["conv1.weight"])


def test_non_finite_loss_stops_before_the_step():
    batch = tiny_batch()
    batch[schema.IMAGE][0, 0, 0, 0, 0] = float("nan")
    network = tiny_resnet()
    before = {k: v.clone() for k, v in network.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        _train("due", [batch], network=network)
    # parameters untouched (batch-norm running statistics do see the NaN forward; the run stops anyway)
    assert all(torch.equal(before[k], v) for k, v in network.named_parameters())


def test_evaluator_metrics_from_one_pass():
    network = tiny_resnet()
    evaluator = ExplanationEvaluator(
        device=torch.device("cpu"), val_data_loader=[tiny_batch(0), tiny_batch(1)], network=network,
        key_val_metric={"val_pr_auc": ClassificationMetric("pr_auc")},
        additional_metrics={"val_roc_auc": ClassificationMetric("roc_auc"), "val_iou": ExplanationMetric("iou"),
                            "val_f1": ExplanationMetric("f1", threshold=0.3)})
    network.train()
    evaluator.run()
    metrics = evaluator.state.metrics
    assert set(metrics) == {"val_pr_auc", "val_roc_auc", "val_iou", "val_f1"}
    assert 0.0 <= metrics["val_iou"] <= 1.0 and 0.0 <= metrics["val_pr_auc"] <= 1.0
    assert network.training  # the evaluator restores the mode
    assert evaluator.state.output["cam"].shape == (4, *SIZE)


def test_evaluation_report_files_and_regeneration(tmp_path):
    import json
    import subprocess
    import sys

    from due_ext.report import EvaluationRecorder

    network = tiny_resnet()
    evaluator = ExplanationEvaluator(device=torch.device("cpu"), val_data_loader=[tiny_batch(0), tiny_batch(1)],
                                     network=network)
    EvaluationRecorder(tmp_path, n_figures=3).attach(evaluator)
    evaluator.run()
    names = {p.name for p in tmp_path.iterdir()}
    assert {"evaluation.npz", "metrics.json", "metrics.csv", "gradcam_overlays.png",
            "explanation_vs_threshold.png"} <= names
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_items"] == 8 and metrics["n_positives"] == 4 and metrics["n_explained"] == 4
    assert set(metrics["explanation_sweep"]) == {f"{0.1 * i:.1f}" for i in range(10)}
    for key in ("iou", "f1", "activation_recall", "comprehensiveness_zero", "sufficiency_blur"):
        assert metrics["explanation"][key]["n"] == 4
    # recall at threshold 0.0 is 1 by definition: every voxel is in the explanation
    assert metrics["explanation_sweep"]["0.0"]["recall"] == pytest.approx(1.0)
    (tmp_path / "metrics.json").unlink()
    run = subprocess.run([sys.executable, "-m", "due_ext", "report", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


@pytest.mark.parametrize("method", ["due", "baseline_plus", "gradia"])
def test_fused_and_reference_losses_give_the_same_update(method, monkeypatch):
    # float64 so that the comparison sees the kernels' arithmetic, not float32 rounding amplified by 1/(max-min)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in tiny_batch(0).items()}
    updated = {}
    for backend in ("reference", "cpp"):
        monkeypatch.setenv("DUE_EXT_BACKEND", backend)
        # plain SGD: the update is the gradient itself (Adam's first step would amplify rounding noise to +-lr)
        _, network = _train(method, [batch], network=tiny_resnet(seed=5).double(), optimizer=torch.optim.SGD, lr=0.1)
        updated[backend] = dict(network.named_parameters())
    for name, value in updated["cpp"].items():
        torch.testing.assert_close(value, updated["reference"][name], rtol=1e-9, atol=1e-10, msg=name)


def _losses_per_step(amp, steps: int = 4):
    """Training losses of ``steps`` SGD steps of ``due`` on one batch, from the same initial weights."""
    from ignite.engine import Events

    network = tiny_resnet(seed=3)
    trainer = ExplanationTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[tiny_batch(0)] * steps,
                                 network=network, optimizer=torch.optim.SGD(network.parameters(), lr=1e-4),
                                 supervision=ExplanationSupervision("due"), amp=amp)
    losses, dtypes = [], set()
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (losses.append(float(e.state.output["loss"])),
                                                                     dtypes.add(e.state.output["pred"].dtype)))
    trainer.run()
    return torch.tensor(losses, dtype=torch.float64), dtypes, trainer


def test_bf16_autocast_training_follows_float32():
    full, full_dtypes, _ = _losses_per_step(False)
    half, half_dtypes, trainer = _losses_per_step("bf16")
    assert full_dtypes == {torch.float32} and half_dtypes == {torch.bfloat16}  # the forward really ran in bf16
    assert not trainer.grad_scaler.is_enabled()  # bf16 keeps float32's exponent range: no loss scaling
    assert torch.isfinite(half).all() and not torch.equal(half, full)
    # bf16 keeps 8 significant bits: unit roundoff u = 2^-8. Autocast rounds the input and the weights of each of
    # the tiny ResNet's 13 convolution/linear layers (accumulation stays float32), so to first order the logits,
    # the CAM and hence both loss terms carry a relative error of at most 2 * 13 * u ~= 0.10 when every rounding
    # adds up; lr 1e-4 keeps the drift of the weights between the two runs (lr x the bf16 gradient error) well
    # below that over 4 steps (measured: at most 1 % on each step).
    torch.testing.assert_close(half, full, rtol=2 * 13 * 2.0**-8, atol=0)


def test_amp_setting_picks_the_autocast_dtype():
    from due_ext.engines.trainer import autocast_dtype

    assert autocast_dtype(False, "cpu") is None and autocast_dtype(None, "cuda") is None
    assert autocast_dtype(True, "cpu") is torch.bfloat16 and autocast_dtype(True, "cuda") is torch.float16
    assert autocast_dtype("bf16", "cuda:0") is torch.bfloat16 and autocast_dtype("fp16", "cuda") is torch.float16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="amp must be"):
        autocast_dtype("fp8", "cpu")
