"""The diffusion interpolator's classical prior and its training data: prior channels (hand-computed fills), the
network's prior input, the sampler feeding each round the block's fill, full-resolution refinement of resampled
windows, the procedural shapes, and the triples in prior, adjacent and sparse (fine-tuning) modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from due_ext.interp.classical import interpolate_gaps
from due_ext.interp.diffusion.inference import interpolate_volumes
from due_ext.interp.diffusion.model import SliceInterpolationUNet, noise_schedule
from due_ext.interp.diffusion.prior import PRIOR_METHODS, block_fills, classical_prior, refine_at_full_resolution
from due_ext.interp.diffusion.sampling import GapJob, SamplerSettings, sample_gaps
from due_ext.interp.diffusion.shapes import FAMILIES, generate_shapes, random_shape
from due_ext.interp.diffusion.training import SliceTripleDataset, diffusion_loss

pytestmark = pytest.mark.usefixtures("one_thread")

CROP = 16


def square(size: int, x0: int, x1: int, y0: int, y1: int) -> np.ndarray:
    out = np.zeros((size, size), np.uint8)
    out[x0:x1, y0:y1] = 1
    return out


def test_classical_prior_hand_computed():
    lower, upper = square(CROP, 2, 6, 2, 6), square(CROP, 4, 8, 2, 6)  # upper = lower shifted by 2 rows
    prior = classical_prior(lower, upper, 3)
    assert prior.shape == (3, len(PRIOR_METHODS), CROP, CROP) and prior.dtype == np.float32
    assert set(np.unique(prior).tolist()) == {-1.0, 1.0}
    union = np.logical_or(lower, upper)
    linear_union = (prior[:, PRIOR_METHODS.index("linear_union")] > 0)
    # t = 1/4, 1/2, 3/4: the nearer slice, the union at the tie, the nearer slice
    for got, expected in zip(linear_union, (lower, union, upper), strict=True):
        assert np.array_equal(got, expected > 0)
    sdf = prior[:, PRIOR_METHODS.index("sdf")] > 0
    # shape-based: at the middle the 4-row square sits one row down (rows 3..6), inside the union
    assert np.array_equal(sdf[1], square(CROP, 3, 7, 2, 6) > 0)
    assert np.array_equal(block_fills(lower, upper, 3, "sdf"), sdf)


def test_classical_prior_validates():
    with pytest.raises(ValueError, match="gap"):
        classical_prior(square(CROP, 2, 6, 2, 6), square(CROP, 2, 6, 2, 6), 0)
    with pytest.raises(ValueError, match="one shape"):
        classical_prior(square(CROP, 2, 6, 2, 6), square(8, 2, 6, 2, 6), 1)


def test_refine_at_full_resolution():
    base_full = np.array([[0.0, 1.0, 1.0]], np.float32)
    base_coarse = np.array([[0.0, 0.8, 0.8]], np.float32)
    # where the network copies its prior the full-resolution fill comes back unchanged
    assert np.array_equal(refine_at_full_resolution(base_coarse, base_coarse, base_full), base_full)
    coarse = np.array([[0.5, 0.2, 0.9]], np.float32)
    expected = np.array([[0.5, 0.4, 1.0]], np.float32)  # 0 + 0.5, 1 - 0.6, min(1 + 0.1, 1)
    np.testing.assert_allclose(refine_at_full_resolution(coarse, base_coarse, base_full), expected, atol=1e-7)


@pytest.fixture(scope="module")
def prior_model() -> SliceInterpolationUNet:
    torch.manual_seed(0)
    model = SliceInterpolationUNet(channels=(8, 16), norm_num_groups=4, num_head_channels=8, crop_size=CROP,
                                   prior_channels=2)
    with torch.no_grad():  # MONAI zero-initialises output convs: random values so the inputs matter
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def test_model_uses_and_checks_its_prior(prior_model):
    assert prior_model.unet.conv_in.conv.in_channels == 5
    x, t = torch.randn(2, 1, CROP, CROP), torch.tensor([10, 500])
    prev = nxt = torch.ones(2, 1, CROP, CROP)
    position, span = torch.tensor([0.5, 0.5]), torch.tensor([2.0, 2.0])
    prior = -torch.ones(2, 2, CROP, CROP)
    with torch.no_grad():
        a = prior_model(x, t, prev, nxt, position, span, prior)
        b = prior_model(x, t, prev, nxt, position, span, -prior)
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="prior must be"):
        prior_model(x, t, prev, nxt, position, span)
    with pytest.raises(ValueError, match="prior must be"):
        prior_model(x, t, prev, nxt, position, span, prior[:, :1])
    plain = SliceInterpolationUNet(channels=(8, 16), norm_num_groups=4, num_head_channels=8, crop_size=CROP)
    with pytest.raises(ValueError, match="no prior channels"):
        plain(x, t, prev, nxt, position, span, prior)
    # the older three-channel checkpoints do not load into a prior network (and vice versa): a loud error
    with pytest.raises(RuntimeError, match="size mismatch"):  # (a fresh network: a failed load copies the rest)
        SliceInterpolationUNet(channels=(8, 16), norm_num_groups=4, num_head_channels=8, crop_size=CROP,
                               prior_channels=2).load_state_dict(plain.state_dict())


#: A schedule that never goes below alpha = 0.5: the copy model's noise is divided by sqrt(1 - a) and the
#: sampler's clean-slice estimate by sqrt(a), so float32 rounding of x_t (|x_t| < 8, ulp 1e-6) reaches the result
#: amplified by at most sqrt(2) per step; 1e-5 covers that with room (a cosine schedule's last alpha, 2e-7,
#: would amplify it 2000x).
GENTLE = torch.linspace(0.99, 0.5, 100, dtype=torch.float64)
ATOL = 1e-5


class PriorCopyModel(torch.nn.Module):
    """An epsilon 'network' whose implied clean slice is its ``sdf`` prior channel at every step, so the sampler
    returns the prior itself (up to rounding); records the priors it was given."""

    prior_channels = 2
    prediction_type = "epsilon"

    def __init__(self, alphas_cumprod: torch.Tensor, crop_size: int = CROP) -> None:
        super().__init__()
        self.alphas = alphas_cumprod
        self.crop_size = crop_size
        self.priors: list[torch.Tensor] = []

    def forward(self, x_t, timesteps, prev, next, position, span, prior):
        self.priors.append(prior.clone())
        alpha = self.alphas[timesteps].to(x_t.dtype).view(-1, 1, 1, 1)
        x0 = prior[:, PRIOR_METHODS.index("sdf"):][:, :1]
        return (x_t - alpha.sqrt() * x0) / (1 - alpha).sqrt()  # x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)


def test_sampler_feeds_each_round_the_blocks_fill():
    schedule = GENTLE
    model = PriorCopyModel(schedule)
    lower, upper = square(CROP, 2, 6, 2, 6), square(CROP, 5, 11, 3, 9)
    jobs = [GapJob(lower, upper, 3, (0,)), GapJob(upper, lower, 1, (1,))]
    out = sample_gaps(model, schedule, jobs, SamplerSettings(steps=1, eta=1.0, repeats=2))
    expected = [torch.from_numpy(classical_prior(job.lower, job.upper, job.gap)) for job in jobs]
    # one step per round: rounds 0, 1, 2; chains (job 0 x 2 repeats, job 1 x 2 repeats) in round 0
    assert torch.equal(model.priors[0], torch.stack([expected[0][0]] * 2 + [expected[1][0]] * 2))
    assert torch.equal(model.priors[1], torch.stack([expected[0][1]] * 2))
    assert torch.equal(model.priors[2], torch.stack([expected[0][2]] * 2))
    sdf = PRIOR_METHODS.index("sdf")
    for job_out, job_prior in zip(out, expected, strict=True):
        torch.testing.assert_close(job_out, ((job_prior[:, sdf] + 1) / 2).expand_as(job_out), atol=ATOL, rtol=0)


def test_sampler_rejects_a_prior_count_it_cannot_provide():
    model = PriorCopyModel(noise_schedule(100))
    model.prior_channels = 3
    with pytest.raises(ValueError, match="prior channels"):
        sample_gaps(model, noise_schedule(100), [GapJob(square(CROP, 2, 6, 2, 6), square(CROP, 2, 6, 2, 6), 1, (0,))],
                    SamplerSettings(steps=1))


@pytest.mark.parametrize("half", [3, 14])  # a window that fits the crop, and one resampled from 36 to 16 voxels
def test_copying_network_reproduces_the_full_resolution_sdf_fill(half):
    """A network that returns its prior unchanged gives exactly the classical SDF fill at full resolution, also
    when the window is resampled (the correction, zero here, is what crosses the resolutions)."""
    schedule = GENTLE
    volume = np.zeros((48, 48, 6), np.uint8)
    yy, xx = np.mgrid[:48, :48]
    volume[..., 0] = (xx - 24) ** 2 + (yy - 24) ** 2 <= half**2
    volume[..., 5] = (xx - 25) ** 2 + ((yy - 23) / 0.8) ** 2 <= half**2
    (mean, variance), = interpolate_volumes(PriorCopyModel(schedule), [volume], [[0, 5]],
                                            SamplerSettings(steps=2, repeats=2), schedule, crop_size=CROP)
    np.testing.assert_allclose(mean, interpolate_gaps(volume, [0, 5], "sdf"), atol=ATOL, rtol=0)
    assert variance.max() < ATOL**2


def test_dataset_prior_matches_the_block_and_adjacent_prev():
    volume = np.zeros((CROP, CROP, 14), np.uint8)
    for z in range(2, 12):  # slice z holds a bar of z - 1 voxels: a crop's area tells which slice it is
        volume[4:4 + (z - 1), 4, z] = 1
    lower_mode = SliceTripleDataset([volume], length=60, crop_size=CROP, min_span=2, max_span=5, augment=False,
                                    prior=True, p_adjacent=0.0, seed=1)
    for i in range(len(lower_mode)):
        item = lower_mode[i]
        span, position = int(item["span"]), float(item["position"])
        expected = classical_prior(item["prev"][0].numpy() > 0, item["next"][0].numpy() > 0, span - 1)
        assert torch.equal(item["prior"], torch.from_numpy(expected[round(position * span) - 1]))
    adjacent = SliceTripleDataset([volume], length=60, crop_size=CROP, min_span=3, max_span=5, p_first=0.0,
                                  augment=False, prior=True, p_adjacent=1.0, seed=1)
    checked = 0
    for i in range(len(adjacent)):
        item = adjacent[i]
        assert abs(float(item["position"]) * float(item["span"]) - 1.0) < 1e-6  # counted from the slice before
        prev_area, target_area = int((item["prev"] > 0).sum()), int((item["target"] > 0).sum())
        if prev_area and target_area:
            assert target_area == prev_area + 1
            checked += 1
    assert checked > 10


def test_sparse_triples_use_drawn_slices_only():
    volume = np.zeros((CROP, CROP, 14), np.uint8)
    for z in range(2, 12):
        volume[4:4 + (z - 1), 4, z] = 1
    drawn = [2, 4, 6, 8, 11]
    annotation = np.zeros_like(volume)
    annotation[..., drawn] = volume[..., drawn]
    dataset = SliceTripleDataset([annotation], length=80, crop_size=CROP, augment=False, prior=True,
                                 annotated_slices=[drawn], max_hidden=2, seed=0)
    spans = set()
    for i in range(len(dataset)):
        item = dataset[i]
        z_prev, z_target, z_next = (int((item[k] > 0).sum()) + 1 for k in ("prev", "target", "next"))
        assert {z_prev, z_target, z_next} <= set(drawn) and z_prev < z_target < z_next
        assert drawn.index(z_next) - drawn.index(z_prev) in (2, 3)  # one or two drawn slices hidden
        span = float(item["span"])
        assert span == z_next - z_prev and abs(float(item["position"]) * span - (z_target - z_prev)) < 1e-5
        spans.add(span)
    assert len(spans) > 2
    with pytest.raises(ValueError, match="at least 3 drawn"):
        SliceTripleDataset([annotation], annotated_slices=[[2, 4]])
    with pytest.raises(ValueError, match="annotated-slice lists"):
        SliceTripleDataset([annotation], annotated_slices=[drawn, drawn])


def test_prior_loss_backpropagates_to_the_prior_input(prior_model):
    volume = np.zeros((CROP, CROP, 10), np.uint8)
    volume[4:10, 4:10, 2:8] = 1
    dataset = SliceTripleDataset([volume], length=4, crop_size=CROP, prior=True, p_adjacent=0.5)
    batch = {k: torch.stack([dataset[i][k] for i in range(4)]) for k in dataset[0]}
    batch["prior"].requires_grad_(True)
    loss = diffusion_loss(prior_model, batch, noise_schedule(100), 0.5, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and batch["prior"].grad.abs().sum() > 0


def test_shapes_cover_every_family_reproducibly():
    for i, family in enumerate(FAMILIES):
        mask = random_shape(np.random.default_rng(i), family, size_xy=32, depth=12)
        assert mask.shape == (32, 32, 12) and mask.dtype == np.uint8 and mask.any()
    shapes = generate_shapes(4, seed=3, size_xy=32, depth=12)
    again = generate_shapes(4, seed=3, size_xy=32, depth=12)
    assert all(np.array_equal(a, b) for a, b in zip(shapes, again, strict=True))
    assert not np.array_equal(shapes[0], generate_shapes(1, seed=4, size_xy=32, depth=12)[0])
    organ = random_shape(np.random.default_rng(0), "organ", size_xy=32, depth=12)
    branching = random_shape(np.random.default_rng(0), "branching", size_xy=32, depth=12)
    assert organ.sum() > 5 * branching.sum()  # organ-sized against thin tubes
    with pytest.raises(ValueError, match="family"):
        random_shape(np.random.default_rng(0), "torus")


def test_shape_mixture_options():
    from scipy import ndimage

    from due_ext.interp.diffusion.shapes import DEFAULT_FAMILIES

    assert set(DEFAULT_FAMILIES) < set(FAMILIES)
    # the default mixture never draws the two families added later (the shipped training set stays as it was)
    drawn = [random_shape(np.random.default_rng([0, i]), size_xy=24, depth=8) for i in range(6)]
    again = [random_shape(np.random.default_rng([0, i]), size_xy=24, depth=8, families=DEFAULT_FAMILIES)
             for i in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(drawn, again, strict=True))
    # thick slices: a log-uniform spacing in [6, 8] mm leaves a lobulated body on few slices, 1 mm on many
    thick = random_shape(np.random.default_rng(1), "lobulated", spacing_z_mm=(6.0, 8.0), log_spacing=True)
    thin = random_shape(np.random.default_rng(1), "lobulated", spacing_z_mm=(1.0, 1.0))
    assert thick.any(axis=(0, 1)).sum() < thin.any(axis=(0, 1)).sum() / 3
    tissue = random_shape(np.random.default_rng(2), "tissue")
    pieces = [ndimage.label(tissue[..., z])[1] for z in np.flatnonzero(tissue.any(axis=(0, 1)))]
    assert max(pieces) >= 3  # many thin pieces per slice
    for bad in ({"families": ("organ", "torus")}, {"families": ()}, {"spacing_z_mm": (5.0, 1.0)}):
        with pytest.raises(ValueError):
            random_shape(np.random.default_rng(0), **bad)
