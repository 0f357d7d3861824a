"""Guards of a long run: gradient clipping, a stop on a non-finite loss or gradient that names the cases, and one
warning naming the cases whose explanations are scored against the sparse annotation for want of a mask."""

import warnings

import pytest
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from test_engines import SIZE, tiny_batch, tiny_resnet

from due_ext.data import schema
from due_ext.engines import ExplanationEvaluator, ExplanationMetric, ExplanationTrainer, NonFiniteLossError
from due_ext.explain.supervision import ExplanationSupervision
from due_ext.metrics.explanation import explanation_scores

FILES = ["case_a.nii.gz", "case_b.nii.gz", "case_c.nii.gz", "case_d.nii.gz"]


def named_batch(seed: int = 0, files=FILES) -> dict:
    """tiny_batch whose image carries the source files, as LoadImaged + collation make it."""
    batch = tiny_batch(seed)
    batch[schema.IMAGE] = MetaTensor(batch[schema.IMAGE], meta={"filename_or_obj": list(files)})
    return batch


def _trainer(network, batches, optimizer=None, **kwargs):
    optimizer = optimizer or torch.optim.SGD(network.parameters(), lr=1.0)
    return ExplanationTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=batches, network=network,
                              optimizer=optimizer, supervision=ExplanationSupervision("due"), **kwargs)


def test_gradient_norm_is_clipped_before_the_step():
    # float64: the update recovered as (before - after) / lr carries rounding of about 1e-16 relative
    batch = {k: v.double() if v.is_floating_point() else v for k, v in tiny_batch(0).items()}
    reference = tiny_resnet(seed=2).double()
    result = ExplanationSupervision("due")(reference, batch)
    grads = torch.autograd.grad(result.loss, list(reference.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    network = tiny_resnet(seed=2).double()
    before = [p.detach().clone() for p in network.parameters()]
    limit = float(norm) / 4
    trainer = _trainer(network, [batch], grad_clip_norm=limit)
    trainer.run()
    assert trainer.state.output["grad_norm"] == pytest.approx(float(norm), rel=1e-9)  # reported before clipping
    # SGD with lr 1: the update is the clipped gradient, g * limit / (norm + 1e-6) (torch's clip coefficient)
    for p0, p1, g in zip(before, network.parameters(), grads, strict=True):
        torch.testing.assert_close(p0 - p1.detach(), g * (limit / (norm + 1e-6)), rtol=1e-9, atol=1e-15)


def test_gradient_clipping_needs_a_positive_norm():
    with pytest.raises(ValueError, match="grad_clip_norm"):
        _trainer(tiny_resnet(), [tiny_batch()], grad_clip_norm=0.0)


def test_non_finite_loss_names_the_items_with_non_finite_input():
    batch = named_batch()
    batch[schema.IMAGE][1, 0, 3, 3, 3] = float("nan")
    batch[schema.WEIGHTS][3, 0, 0, 0, 0] = float("inf")
    network = tiny_resnet()
    before = {k: v.clone() for k, v in network.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="non-finite loss") as error:
        _trainer(network, [batch]).run()
    message = str(error.value)
    assert "case_b.nii.gz (image)" in message and "case_d.nii.gz (weights)" in message
    assert "case_a" not in message and "case_c" not in message
    assert all(torch.equal(before[k], v) for k, v in network.named_parameters())


class _InfiniteGradient(torch.nn.Module):
    """Finite logits (zeros) whose gradient is infinite: d sqrt(h)/dh at h = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(SIZE[0] * SIZE[1] * SIZE[2], 2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.fc(image.flatten(1))
        return torch.sqrt(h - h.detach())


def test_non_finite_gradient_stops_before_the_step_and_names_the_batch():
    network = _InfiniteGradient()
    before = {k: v.clone() for k, v in network.named_parameters()}
    trainer = ExplanationTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[named_batch()],
                                 network=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
                                 supervision=ExplanationSupervision("baseline"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient .*case_a\.nii\.gz, case_b\.nii\.gz"):
        trainer.run()
    assert all(torch.equal(before[k], v) for k, v in network.named_parameters())


def _evaluate(batches, epochs: int = 2):
    evaluator = ExplanationEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=tiny_resnet(),
                                     key_val_metric={"iou": ExplanationMetric("iou")})
    outputs = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(1, epochs + 1):
            evaluator.run(epoch)
    return evaluator, outputs, [w for w in caught if "sparse 'annotation'" in str(w.message)]


def test_evaluator_warns_once_naming_cases_scored_against_the_annotation():
    """case_a has a full mask; case_b's mask is the empty volume that stands in for a missing one."""
    batch = named_batch()
    batch[schema.MASK][1] = 0.0
    evaluator, outputs, fallbacks = _evaluate([batch])
    assert len(fallbacks) == 1  # two epochs, one warning
    assert "case_b.nii.gz" in str(fallbacks[0].message) and "case_a" not in str(fallbacks[0].message)
    out = outputs[-1]
    assert out["has_mask"].tolist() == [True, True, False, False]
    torch.testing.assert_close(out["mask"][0], batch[schema.MASK][0, 0])
    torch.testing.assert_close(out["mask"][1], batch[schema.ANNOTATION][1, 0])
    expected = explanation_scores(out["cam"][:2], out["mask"][:2])["iou"].mean()
    assert evaluator.state.metrics["iou"] == pytest.approx(float(expected), rel=1e-6)


def test_evaluator_without_mask_key_warns_for_every_annotated_positive():
    batch = named_batch()
    del batch[schema.MASK]
    _, outputs, fallbacks = _evaluate([batch], epochs=1)
    assert len(fallbacks) == 1 and "2 positive case(s)" in str(fallbacks[0].message)
    torch.testing.assert_close(outputs[-1]["mask"], batch[schema.ANNOTATION][:, 0])


def test_evaluator_with_full_masks_does_not_warn():
    _, _, fallbacks = _evaluate([named_batch()], epochs=1)
    assert fallbacks == []
