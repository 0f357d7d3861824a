"""Training settings of the DUE bundle (issue 15 item 3): the learning-rate schedule with warm-up and its exact
resume, the rule that picks the best epoch among equally good ones, and the training augmentation that moves the
image and every explanation volume together."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import LrScheduleHandler
from monai.transforms import Compose, Randomizable

from due_ext.bundles import (
    classical_fill,
    lr_scheduler,
    metric_comparison,
    training_augmentation,
    training_transforms,
)
from due_ext.engines import TrainingCheckpoint
from due_ext.interp.transforms import NEAREST_FILL, SDF_FILL, ClassicalFilld

REPO = Path(__file__).resolve().parents[1]


def _rates(schedule: str, max_epochs: int, warmup: int, base: float = 1e-3) -> list[float]:
    """The rate each epoch trains with, the scheduler stepped after every epoch as LrScheduleHandler does."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = lr_scheduler(optimizer, schedule, max_epochs, warmup)
    rates = []
    for _ in range(max_epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_then_cosine_matches_the_formula():
    # warm-up: 0.1 -> 1 linearly over 2 epochs (epoch 0: 0.1, epoch 1: 0.55); then cosine over the 4 left,
    # lr_e = base (1 + cos(pi k / 4)) / 2 for k = 0..3
    expected = [0.1e-3, 0.55e-3] + [1e-3 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    # the schedulers compute in float64 by products of factors: 1e-12 relative is far above their rounding
    assert _rates("cosine", 6, 2) == pytest.approx(expected, rel=1e-12)


def test_constant_schedule_without_warmup_is_the_plain_optimizer():
    assert _rates("constant", 5, 0) == [1e-3] * 5


def test_a_run_shorter_than_its_warmup_trains_at_warmup_rates():
    # a one-epoch smoke test of a profile with a 2-epoch warm-up: 0.1 x the rate, no error
    assert _rates("cosine", 1, 2) == pytest.approx([1e-4], rel=1e-12)
    assert _rates("cosine", 2, 2) == pytest.approx([1e-4, 0.55e-3], rel=1e-12)


def test_constant_after_warmup_stays_at_the_full_rate():
    assert _rates("constant", 5, 1) == pytest.approx([1e-4, 1e-3, 1e-3, 1e-3, 1e-3], rel=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "step"}, "lr_schedule must be one of"),
    ({"warmup_epochs": -1}, "warmup_epochs must be >= 0 and max_epochs >= 1, got -1 and 5"),
    ({"max_epochs": 0}, "max_epochs >= 1"),
    ({"warmup_epochs": 1, "warmup_start": 0.0}, "warmup_start must lie in"),
])
def test_bad_schedule_settings_are_named(kwargs, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=message):
        lr_scheduler(optimizer, **{"schedule": "cosine", "max_epochs": 5, **kwargs})


def _train(folder: Path, max_epochs: int, stop_after: int | None = None) -> tuple[torch.Tensor, list[float]]:
    """A linear model trained by SGD with warm-up + cosine, checkpointed as the bundle does; returns the final
    weights and the rate of every epoch this run trained."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = lr_scheduler(optimizer, "cosine", max_epochs, warmup_epochs=2)
    x, y = torch.arange(12.0).reshape(4, 3) / 10, torch.ones(4, 1)

    def step(engine, _batch):
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()

    engine = Engine(step)
    rates = []
    engine.add_event_handler(Events.EPOCH_STARTED, lambda _: rates.append(optimizer.param_groups[0]["lr"]))
    TrainingCheckpoint(folder, {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler}).attach(engine)
    LrScheduleHandler(scheduler, print_lr=False).attach(engine)
    if stop_after is not None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda e: e.terminate())
    engine.run([0, 1], max_epochs=max_epochs)
    return model.weight.detach().clone(), rates


def test_resume_continues_the_schedule_where_it_stopped(tmp_path):
    straight, straight_rates = _train(tmp_path / "straight", 6)
    _, before = _train(tmp_path / "resumed", 6, stop_after=3)
    resumed, after = _train(tmp_path / "resumed", 6)
    assert before + after == straight_rates  # epochs 4-6 train with the rates of an uninterrupted run
    assert len(after) == 3
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)


def test_checkpoint_without_the_scheduler_is_refused(tmp_path):
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = Engine(lambda e, b: None)
    TrainingCheckpoint(tmp_path, {"model": model, "optimizer": optimizer}).attach(engine)
    engine.run([0], max_epochs=1)  # a checkpoint of a run without a schedule
    engine = Engine(lambda e, b: None)
    TrainingCheckpoint(tmp_path, {"model": model, "optimizer": optimizer,
                                  "lr_scheduler": lr_scheduler(optimizer, "cosine", 2)}).attach(engine)
    with pytest.raises(RuntimeError, match=r"lacks \['lr_scheduler'\]"):
        engine.run([0], max_epochs=2)


def test_best_epoch_ties_keep_the_first_or_the_last():
    assert metric_comparison("first")(1.0, 1.0) is False and metric_comparison("first")(1.0, 0.9) is True
    assert metric_comparison("last")(1.0, 1.0) is True and metric_comparison("last")(0.9, 1.0) is False
    with pytest.raises(ValueError, match="best_ties must be"):
        metric_comparison("latest")


def _parsed(root: Path, key: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "due" / "train.json"))
    parser.update({"bundle_root": str(root), "block_inplanes": [4, 8, 8, 8], "device": "$torch.device('cpu')",
                   "training_datalist": "unused", "validate#dataloader": "$[{}]", "validate#handlers": [],
                   **overrides})
    return parser.get_parsed_content(key)


def test_bundle_keys_reach_the_scheduler_and_the_evaluator(tmp_path):
    scheduler = _parsed(tmp_path, "lr_scheduler", lr_schedule="cosine", warmup_epochs=3, max_epochs=10)
    assert isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR)
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # first warm-up epoch: 0.1 x 1e-3
    evaluator = _parsed(tmp_path, "validate#evaluator", best_ties="last")
    assert evaluator.metric_cmp_fn(0.5, 0.5) is True
    assert _parsed(tmp_path, "validate#evaluator").metric_cmp_fn(0.5, 0.5) is False  # default: the first best


def _item(depth: int = 8) -> dict:
    """One channel-first item: an asymmetric lesion on slices 2-5, annotated on 2 and 5."""
    lesion = np.zeros((1, 16, 16, depth), np.float32)
    lesion[0, 3:9, 4:12, 2:6] = 1.0
    lesion[0, 3:5, 4:6, 2:6] = 0.0  # a notch so that flips are visible
    annotated = np.zeros_like(lesion)
    annotated[..., [2, 5]] = 1.0
    return {"image": torch.from_numpy(lesion * 0.8 + 0.1), "annotation": torch.from_numpy(lesion * annotated),
            "annotated_mask": torch.from_numpy(annotated), "mask": torch.from_numpy(lesion.copy()),
            NEAREST_FILL: torch.from_numpy(lesion.copy()), "label": 1}


def test_flips_move_image_and_masks_together():
    steps = training_augmentation("baseline_plus", {"flip": 1.0})
    out = Compose(steps).set_random_state(0)(_item())
    flipped = _item()["mask"].flip(1, 2, 3)
    for key in ("mask", NEAREST_FILL):
        assert torch.equal(torch.as_tensor(out[key]), flipped)
    assert torch.equal(torch.as_tensor(out["image"]), flipped * 0.8 + 0.1)
    assert torch.equal(torch.as_tensor(out["annotated_mask"]), _item()["annotated_mask"].flip(1, 2, 3))


def test_in_plane_affine_keeps_every_slice_a_slice():
    steps = training_augmentation("due", {"rotate_deg": 30, "scale": 0.2, "affine_prob": 1.0})
    item = {**_item(), "interpolation": _item()["mask"], "weights": torch.full((1, 16, 16, 8), 0.5)}
    for seed in range(3):
        out = Compose(steps).set_random_state(seed)(dict(item))
        # rotation and zoom about Z: drawn slices stay whole drawn slices, empty slices stay empty
        assert torch.equal(torch.as_tensor(out["annotated_mask"]), item["annotated_mask"])
        lesion_slices = torch.as_tensor(out["mask"]).flatten(0, 2).amax(0)
        assert lesion_slices.tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
        assert torch.as_tensor(out["weights"]).unique().tolist() == [0.5]  # border padding: no made-up weights
        assert not torch.equal(torch.as_tensor(out["mask"]), item["mask"])  # it did move
        # masks stay binary (nearest), the image follows the mask (bilinear, so compare where both are clear)
        assert set(torch.as_tensor(out["annotation"]).unique().tolist()) <= {0.0, 1.0}
        image, mask = torch.as_tensor(out["image"]), torch.as_tensor(out["mask"])
        assert image[mask > 0.5].mean() > 0.8 > image[mask < 0.5].mean()


def test_intensity_steps_touch_the_image_only():
    steps = training_augmentation("baseline_plus", {"intensity": 0.5, "noise_std": 0.1})
    for seed in range(4):
        out = Compose(steps).set_random_state(seed)(_item())
        for key in ("annotation", "annotated_mask", "mask", NEAREST_FILL):
            assert torch.equal(torch.as_tensor(out[key]), _item()[key])
    changed = [not torch.equal(torch.as_tensor(Compose(steps).set_random_state(s)(_item())["image"]),
                               _item()["image"]) for s in range(4)]
    assert any(changed)


def test_augmentation_off_and_unknown_keys():
    assert training_augmentation("due", None) == []
    with pytest.raises(ValueError, match="unknown key 'rotate'"):
        training_augmentation("due", {"rotate": 10})


def test_training_chain_caches_everything_before_the_first_random_step():
    preprocessing = Compose([Compose([ClassicalFilld("nearest")]), ClassicalFilld("sdf")])
    chain = training_transforms(preprocessing, "baseline_plus", {"flip": 0.5})
    first_random = chain.get_index_of_first(lambda t: isinstance(t, Randomizable))
    assert first_random == 2  # the two deterministic steps, unnested, come first: CacheDataset caches them
    assert training_transforms(preprocessing, "baseline_plus").get_index_of_first(
        lambda t: isinstance(t, Randomizable)) is None


def test_each_method_gets_its_classical_fill():
    assert classical_fill("sdf_fill") == "sdf" and classical_fill("baseline_plus") == "nearest"
    assert ClassicalFilld(classical_fill("sdf_fill")).output_key == SDF_FILL
    assert ClassicalFilld().output_key == NEAREST_FILL
    with pytest.raises(ValueError, match="ClassicalFilld: method 'spline'"):
        ClassicalFilld("spline")


def test_validation_share_moves_items_from_training_only():
    from due_ext.data.builders import build_dataset
    from due_ext.data.builders.splits import split_counts

    # the bounded profile's 64 per class: 24 validation instead of 16, the 16 test items untouched
    assert split_counts(64, val_fraction=0.375) == {"training": 24, "validation": 24, "test": 16}
    assert split_counts(64) == {"training": 32, "validation": 16, "test": 16}
    with pytest.raises(ValueError, match="val_fraction 0.8 leaves no training positives of 8"):
        split_counts(8, "positives", val_fraction=0.8)
    with pytest.raises(ValueError, match="bounded builder only, not of 'phantom'"):
        build_dataset("phantom", "unused", val_fraction=0.3)


def test_bounded_profile_sets_the_training_keys():
    import json

    profile = json.loads((REPO / "bundles" / "due" / "bounded.json").read_text())
    assert profile["lr_schedule"] == "cosine" and profile["best_ties"] == "last"
    assert training_augmentation("due", profile["augmentation"])  # every key known
    assert "val_fraction=@val_fraction" in profile["dataset_dir"]


def test_augmented_epoch_depends_only_on_seed_and_epoch():
    """EpochSeeder reseeds the training chain's random steps: epoch 3's augmented item is the same whether epochs 1
    and 2 ran before it (an uninterrupted run) or not (a run resumed at epoch 3)."""
    from types import SimpleNamespace

    from monai.data import CacheDataset

    from due_ext.engines import EpochSeeder

    chain = training_transforms(Compose([]), "baseline_plus",
                                {"flip": 0.5, "rotate_deg": 20, "scale": 0.1, "affine_prob": 1.0, "intensity": 0.2})
    dataset = CacheDataset([_item()], transform=chain, progress=False)
    seeder = EpochSeeder(seed=5, dataset=dataset)

    def epoch(e: int) -> torch.Tensor:
        seeder(SimpleNamespace(state=SimpleNamespace(epoch=e)))
        return torch.as_tensor(dataset[0]["image"]).clone()

    resumed = epoch(3)
    straight = [epoch(e) for e in (1, 2, 3)]
    torch.testing.assert_close(straight[2], resumed, rtol=0, atol=0)
    assert not torch.equal(straight[0], straight[2])  # the epochs differ from each other
