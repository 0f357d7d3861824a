"""Diffusion interpolator: condition masking, gap/position handling, crops, training triples, batched sampling
(autoregression, determinism, chunking) and whole-volume block handling. Tiny random networks only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from due_ext.interp.diffusion.crops import crop_window, extract_crop, paste_crop
from due_ext.interp.diffusion.inference import interpolate_volumes
from due_ext.interp.diffusion.model import (
    SliceInterpolationUNet,
    drop_conditions,
    epsilon_from_output,
    noise_schedule,
    prediction_target,
)
from due_ext.interp.diffusion.sampling import GapJob, SamplerSettings, ddim_timesteps, sample_gaps
from due_ext.interp.diffusion.training import SliceTripleDataset, diffusion_loss

pytestmark = pytest.mark.usefixtures("one_thread")

CROP = 16


@pytest.fixture(scope="module")
def tiny_model() -> SliceInterpolationUNet:
    torch.manual_seed(0)
    model = SliceInterpolationUNet(channels=(8, 16), norm_num_groups=4, num_head_channels=8, crop_size=CROP)
    return randomise(model).eval()


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """MONAI zero-initialises the output conv and every residual branch's last conv, so an untrained network
    predicts 0 whatever its inputs; give those weights random values so the inputs matter."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.fixture(scope="module")
def schedule() -> torch.Tensor:
    return noise_schedule(100)


def square(size: int, half: int, centre: tuple[int, int] | None = None) -> np.ndarray:
    out = np.zeros((size, size), np.uint8)
    cx, cy = centre or (size // 2, size // 2)
    if half > 0:
        out[cx - half:cx + half, cy - half:cy + half] = 1
    return out


class SpyModel(torch.nn.Module):
    """Predicts eps = 0 and records what it was conditioned on."""

    crop_size = CROP

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, torch.Tensor]] = []

    def forward(self, x_t, timesteps, prev, next, position, span):
        self.calls.append({"prev": prev.clone(), "next": next.clone(), "position": position.clone(),
                           "span": span.clone(), "t": timesteps.clone()})
        return torch.zeros_like(x_t)


def test_drop_conditions_zeroes_whole_slices_independently():
    prev = torch.ones(4000, 1, 4, 4)
    nxt = -torch.ones(4000, 1, 4, 4)
    p, n = drop_conditions(prev, nxt, 0.5, generator=torch.Generator().manual_seed(0))
    kept_p = p.flatten(1).abs().amax(1) > 0
    kept_n = n.flatten(1).abs().amax(1) > 0
    # whole slices: each sample is either untouched or all zero
    assert torch.all((p.flatten(1) == 1).all(1) | (p.flatten(1) == 0).all(1))
    assert torch.all((n.flatten(1) == -1).all(1) | (n.flatten(1) == 0).all(1))
    assert abs(kept_p.float().mean() - 0.5) < 0.04 and abs(kept_n.float().mean() - 0.5) < 0.04
    both = (kept_p & kept_n).float().mean()
    assert abs(both - 0.25) < 0.04  # independent masks
    p0, n0 = drop_conditions(prev, nxt, 0.0)
    assert torch.equal(p0, prev) and torch.equal(n0, nxt)
    p1, _ = drop_conditions(prev, nxt, 1.0)
    assert not p1.any()
    with pytest.raises(ValueError, match="p_drop"):
        drop_conditions(prev, nxt, 1.5)


def test_dropped_condition_differs_from_empty_slice(tiny_model):
    # an empty slice is all -1; a dropped one is all 0: the network must see a difference
    x = torch.randn(1, 1, CROP, CROP)
    t = torch.tensor([10])
    full = torch.from_numpy(square(CROP, 4)).float()[None, None] * 2 - 1
    empty = -torch.ones_like(full)
    with torch.no_grad():
        a = tiny_model(x, t, full, empty, torch.tensor([0.5]), torch.tensor([2.0]))
        b = tiny_model(x, t, full, torch.zeros_like(full), torch.tensor([0.5]), torch.tensor([2.0]))
    assert not torch.allclose(a, b)


def test_model_uses_position_and_span(tiny_model):
    torch.manual_seed(1)
    # the gap MLP's last layer starts random, so different (position, span) must change the output
    x, c = torch.randn(1, 1, CROP, CROP), torch.randn(1, 1, CROP, CROP)
    t = torch.tensor([50])
    with torch.no_grad():
        base = tiny_model(x, t, c, c, torch.tensor([0.25]), torch.tensor([4.0]))
        other_position = tiny_model(x, t, c, c, torch.tensor([0.75]), torch.tensor([4.0]))
        other_span = tiny_model(x, t, c, c, torch.tensor([0.25]), torch.tensor([2.0]))
    assert base.shape == (1, 1, CROP, CROP)
    assert not torch.allclose(base, other_position) and not torch.allclose(base, other_span)


def test_model_rejects_bad_shapes(tiny_model):
    x = torch.zeros(2, 1, CROP, CROP)
    with pytest.raises(ValueError, match="must all be"):
        tiny_model(x, torch.zeros(2, dtype=torch.long), x[:, :, :8], x, torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="position and span"):
        tiny_model(x, torch.zeros(2, dtype=torch.long), x, x, torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match="divisible"):
        SliceInterpolationUNet(channels=(8, 16, 16), norm_num_groups=4, crop_size=18)


def test_crop_window_round_trip_and_resampling():
    slice_ = np.zeros((40, 50), np.uint8)
    slice_[5:11, 30:36] = 1  # 6x6 lesion: fits in the 16 crop, no resampling
    window = crop_window([slice_], CROP)
    assert window.side == CROP
    crop = extract_crop(slice_, window, CROP)
    assert crop.sum() == 36
    assert np.array_equal(paste_crop(crop, window, slice_.shape), slice_.astype(np.float32))
    assert crop_window([np.zeros((8, 8))], CROP) is None
    big = np.zeros((64, 64), np.uint8)
    big[10:50, 12:52] = 1  # 40 voxels wide: window grows past the crop and is resampled
    window = crop_window([big], CROP)
    assert window.side > CROP
    crop = extract_crop(big, window, CROP)
    assert crop.shape == (CROP, CROP) and set(np.unique(crop)) <= {0.0, 1.0}
    back = paste_crop(crop, window, big.shape) > 0.5
    assert (back & (big > 0)).sum() * 2 / (back.sum() + big.sum()) > 0.9
    # window at the border: outside reads as background and pasting clips
    corner = np.zeros((20, 20), np.uint8)
    corner[0:3, 0:3] = 1
    window = crop_window([corner], CROP)
    assert window.x0 < 0 and window.y0 < 0
    assert np.array_equal(paste_crop(extract_crop(corner, window, CROP), window, corner.shape), corner)


def _labelled_volume() -> np.ndarray:
    """16x16x14 mask; slice z in 2..11 holds a bar of z - 1 voxels, so a crop's area tells which slice it is."""
    volume = np.zeros((CROP, CROP, 14), np.uint8)
    for z in range(2, 12):
        volume[4:4 + (z - 1), 4, z] = 1
    return volume


def test_triples_respect_offsets_and_spans():
    volume = _labelled_volume()
    dataset = SliceTripleDataset([volume], length=200, crop_size=CROP, min_span=2, max_span=5, p_first=0.5,
                                 augment=False, seed=3)
    area_to_z = {z - 1: z for z in range(2, 12)}
    spans, offsets_one, empty_condition = [], 0, 0
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["target"].shape == item["prev"].shape == item["next"].shape == (1, CROP, CROP)
        assert set(torch.unique(item["target"]).tolist()) <= {-1.0, 1.0}
        span, position = float(item["span"]), float(item["position"])
        assert 2 <= span <= 5 and 0 < position < 1
        offset = round(position * span)
        assert abs(offset - position * span) < 1e-5
        areas = [int((item[k] > 0).sum()) for k in ("prev", "target", "next")]
        assert areas[0] or areas[2], "both conditions empty"
        if areas[0] and areas[2]:
            z_prev, z_target, z_next = (area_to_z.get(a) for a in areas)
            assert z_next - z_prev == span  # the conditions are span slices apart ...
            if areas[1]:
                assert z_target - z_prev == offset  # ... and the target sits at the given offset
        else:
            empty_condition += 1
        spans.append(span)
        offsets_one += offset == 1
    assert set(spans) == {2.0, 3.0, 4.0, 5.0}
    assert 0.5 < offsets_one / len(dataset) < 0.9
    assert empty_condition > 0  # the object ends inside some gaps: the no-bridging case is trained


def test_triples_deterministic_per_epoch():
    volume = _labelled_volume()
    a = SliceTripleDataset([volume], length=8, crop_size=CROP, seed=1)
    b = SliceTripleDataset([volume], length=8, crop_size=CROP, seed=1)
    assert all(torch.equal(a[i]["target"], b[i]["target"]) and torch.equal(a[i]["span"], b[i]["span"])
               for i in range(8))
    first = [a[i]["prev"].clone() for i in range(8)]
    a.set_epoch(1)
    assert any(not torch.equal(first[i], a[i]["prev"]) for i in range(8))
    fixed = SliceTripleDataset([volume], length=8, crop_size=CROP, seed=1, resample_each_epoch=False)
    before = fixed[0]["prev"].clone()
    fixed.set_epoch(5)
    assert torch.equal(before, fixed[0]["prev"])


def test_diffusion_loss_backpropagates(tiny_model, schedule):
    dataset = SliceTripleDataset([_labelled_volume()], length=4, crop_size=CROP)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    model = randomise(SliceInterpolationUNet(channels=(8, 16), norm_num_groups=4, num_head_channels=8,
                                             crop_size=CROP))
    loss = diffusion_loss(model, batch, schedule, 0.5, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 0
    assert model.unet.class_embedding.mlp[0].weight.grad.abs().sum() > 0  # the gap embedding learns


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_prediction_target_and_epsilon_are_inverse(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64).sign()
    noise = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    alpha = torch.tensor([1e-9, 0.02, 0.5, 0.9, 0.999], dtype=torch.float64).view(5, 1, 1, 1)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    target = prediction_target(x0, noise, alpha, prediction_type)
    assert torch.allclose(epsilon_from_output(target, x_t, alpha, prediction_type), noise, atol=1e-12)
    if prediction_type == "v_prediction":  # v -> -x0 at pure noise, v -> eps without noise
        assert torch.allclose(target[0], -x0[0], atol=1e-4)
        assert torch.allclose(target[-1], noise[-1], atol=0.05)


def test_v_loss_weighs_the_clean_slice_error_at_high_noise():
    """The reason for v-prediction: at a = 0.001 an error of 1 on x0 moves the epsilon target by only 0.03,
    the v target by 1."""
    x0, noise, alpha = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0.001
    v_shift = (prediction_target(x0, noise, alpha, "v_prediction")
               - prediction_target(x0 - 1, noise, alpha, "v_prediction")).abs().max()
    x_t = alpha ** 0.5 * x0
    eps_shift = (x_t - alpha ** 0.5 * (x0 - 1)) / (1 - alpha) ** 0.5 - noise  # eps implied by the wrong x0
    assert float(eps_shift.abs().max()) < 0.04 and float(v_shift) > 0.99


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        SliceInterpolationUNet(channels=(8, 16), norm_num_groups=4, crop_size=CROP, prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_target(torch.zeros(1), torch.zeros(1), 0.5, "x0")


def test_ddim_timesteps_trailing():
    assert ddim_timesteps(1000, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert ddim_timesteps(100, 100) == list(range(99, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(100, 0)


def test_autoregressive_conditioning():
    spy = SpyModel()
    lower = square(CROP, 4)
    upper = square(CROP, 2)
    jobs = [GapJob(lower, upper, 3, (0,)), GapJob(upper, lower, 1, (1,))]
    settings = SamplerSettings(steps=2, eta=0.0, repeats=2, bf16=False)
    out = sample_gaps(spy, noise_schedule(100), jobs, settings)
    assert out[0].shape == (2, 3, CROP, CROP) and out[1].shape == (2, 1, CROP, CROP)
    rounds = spy.calls[::2]  # two denoising steps per round
    assert len(rounds) == 3
    # round 0: both jobs x 2 repeats; the 3-gap chains see span 4 (position 1/4), the 1-gap chains span 2
    assert rounds[0]["span"].tolist() == [4.0, 4.0, 2.0, 2.0]
    assert torch.allclose(rounds[0]["position"], 1.0 / rounds[0]["span"])
    assert rounds[1]["span"].tolist() == [3.0, 3.0] and rounds[2]["span"].tolist() == [2.0, 2.0]
    assert torch.equal(rounds[0]["prev"][0, 0], torch.from_numpy(lower).float() * 2 - 1)
    for r in (1, 2):
        # each next round is conditioned on the chain's own previous slice, binarised, and on the upper slice
        expected_prev = torch.where(out[0][:, r - 1] > 0.5, 1.0, -1.0)
        assert torch.equal(rounds[r]["prev"][:, 0], expected_prev)
        assert torch.equal(rounds[r]["next"][:, 0], (torch.from_numpy(upper).float() * 2 - 1).expand(2, -1, -1))
    assert rounds[0]["t"].tolist() == [99] * 4


class ElementwiseModel(torch.nn.Module):
    """A denoiser made of elementwise multiply-adds only: each chain's output is bitwise independent of which
    chains share its batch (no reduction whose order depends on the batch size), so chunking and batch mates
    can be checked for exact equality, whatever kernels the CPU picks."""

    crop_size = CROP

    def forward(self, x_t, timesteps, prev, next, position, span):
        per_chain = (0.25 * position + 0.01 * span + 1e-3 * timesteps.to(x_t.dtype))[:, None, None, None]
        return 0.5 * x_t + 0.3 * prev - 0.2 * next + per_chain


JOBS = [GapJob(square(CROP, 4), square(CROP, 3), 1, (0, 1)), GapJob(square(CROP, 2), square(CROP, 5), 2, (2, 3))]
SETTINGS = SamplerSettings(steps=2, eta=1.0, repeats=2, seed=7, bf16=False, max_batch=64)


def with_settings(**changes) -> SamplerSettings:
    return SamplerSettings(**{**SETTINGS.__dict__, **changes})


def test_sampling_bookkeeping_is_seeded_and_chunk_invariant(schedule):
    """Seeds, chain order, chunking and batch mates: exact, because the model's arithmetic is batch-independent
    (a real network's is not; see the next test)."""
    model = ElementwiseModel()
    a = sample_gaps(model, schedule, JOBS, SETTINGS)
    assert all(torch.equal(x, y) for x, y in zip(a, sample_gaps(model, schedule, JOBS, SETTINGS), strict=True))
    chunked = sample_gaps(model, schedule, JOBS, with_settings(max_batch=2))
    assert all(torch.equal(x, y) for x, y in zip(a, chunked, strict=True))
    alone = sample_gaps(model, schedule, JOBS[1:], SETTINGS)  # a job's chains ignore their batch mates
    assert torch.equal(alone[0], a[1])
    other = sample_gaps(model, schedule, JOBS, with_settings(seed=8))
    assert not torch.allclose(a[0], other[0])
    assert all(((x >= 0) & (x <= 1)).all() for x in a)
    assert not torch.equal(a[0][0], a[0][1])  # repeats differ


# Float32 bound for the real UNet, whose convolutions oneDNN may run with other kernels (another summation order)
# for another batch size: each of the network's ~20 layers sums at most K = 16 channels x 3 x 3 = 144 products
# of O(1) terms, so reordering moves an activation by at most ~K * 2**-24 = 8.6e-6 relative, and the layers add
# up to ~1.7e-4; two DDIM steps with |coefficients| <= ~3 and outputs in [0, 1] after (x + 1) / 2 keep it under
# 1e-3. Bitwise equality is not a property of the sampler, and only round 0 is compared: later rounds condition
# on a binarised slice, where a 1-ulp difference at the threshold legitimately flips a pixel of the condition.
FLOAT32_REORDER_TOL = 1e-3


def test_sampling_with_a_real_network_is_seeded_and_nearly_chunk_invariant(tiny_model, schedule):
    a = sample_gaps(tiny_model, schedule, JOBS, SETTINGS)
    b = sample_gaps(tiny_model, schedule, JOBS, SETTINGS)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # same batches: same kernels, same bits
    chunked = sample_gaps(tiny_model, schedule, JOBS, with_settings(max_batch=2))
    alone = sample_gaps(tiny_model, schedule, JOBS[1:], SETTINGS)
    for reference, other in ((a[0], chunked[0]), (a[1], chunked[1]), (a[1], alone[0])):
        assert (reference[:, 0] - other[:, 0]).abs().max() <= FLOAT32_REORDER_TOL
    other_seed = sample_gaps(tiny_model, schedule, JOBS, with_settings(seed=8))
    assert (a[0] - other_seed[0]).abs().max() > 100 * FLOAT32_REORDER_TOL  # the seed matters far beyond rounding


def test_sampler_settings_validation():
    with pytest.raises(ValueError, match="eta"):
        SamplerSettings(eta=1.5)
    with pytest.raises(ValueError, match="steps"):
        SamplerSettings(steps=0)


def _volume_with_slices(slices: dict[int, np.ndarray], shape=(20, 20, 10)) -> np.ndarray:
    volume = np.zeros(shape, np.uint8)
    for z, s in slices.items():
        volume[..., z] = s
    return volume


@pytest.mark.parametrize("annotated", [[3, 4], [5], [0, 9], [2, 3, 7]])
def test_interpolate_volumes_block_cases(tiny_model, schedule, annotated):
    shape = (20, 20, 10)
    volume = _volume_with_slices({z: square(20, 3 + (z % 3)) for z in annotated}, shape)
    settings = SamplerSettings(steps=1, repeats=2, bf16=False)
    (mean, variance), = interpolate_volumes(tiny_model, [volume], [annotated], settings, schedule)
    assert mean.shape == variance.shape == shape
    for z in annotated:  # annotated slices copied exactly, no variance there
        assert np.array_equal(mean[..., z], volume[..., z]) and not variance[..., z].any()
    first, last = min(annotated), max(annotated)
    outside = [z for z in range(shape[2]) if z < first or z > last]
    assert not mean[..., outside].any() and not variance[..., outside].any()  # no extrapolation
    assert mean.min() >= 0 and mean.max() <= 1 and variance.min() >= 0 and variance.max() <= 0.25 + 1e-6
    missing = [z for z in range(first, last + 1) if z not in annotated]
    if missing:
        assert variance[..., missing].any()  # the gaps were sampled (a random network disagrees with itself)


def test_interpolate_volumes_both_empty_block_stays_empty(tiny_model, schedule):
    volume = _volume_with_slices({1: square(20, 0), 5: square(20, 0)})
    (mean, variance), = interpolate_volumes(tiny_model, [volume], [[1, 5]], SamplerSettings(steps=1, repeats=1),
                                            schedule)
    assert not mean.any() and not variance.any()


def test_interpolate_volumes_validates(tiny_model):
    with pytest.raises(ValueError, match="outside"):
        interpolate_volumes(tiny_model, [np.zeros((8, 8, 4))], [[1, 6]])
    with pytest.raises(ValueError, match=r"\(X, Y, Z\)"):
        interpolate_volumes(tiny_model, [np.zeros((8, 8))], [[0, 1]])
