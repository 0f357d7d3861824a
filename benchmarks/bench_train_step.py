"""Training-step time: DUE's batched step against a faithful port of the original per-sample approach.

Same network (the DUE bundle's demo ResNet18), same data (lung-CT-sized 64x64x32 batches of 4 annotated
positives and 4 negatives, annotations on every 3rd slice), same optimizer, one process.

- ours: one forward pass of the batch with Grad-CAM features captured by a hook (exact GAP+linear alpha), the
  fused explanation-loss op on the positives, one backward; interpolation and weights were computed once per
  dataset by the bundles (their one-time cost is reported separately, per volume).
- original (port of the DUE release's ``train_due``): the batch forward for cross-entropy, then for every
  positive a batch-1 forward and backward for its Grad-CAM, the uncertainty predictor run block by block to
  recompute the weights in the loop (min-max of sigmoid(-var) per block), the loss on the stacked maps.

- ours-bf16: ours under CPU bf16 autocast around forward and loss, backward and step outside, as the trainer runs
  ``amp: "bf16"`` (:class:`~due_ext.engines.ExplanationTrainer`).

Each variant trains its own copy of the same initial network; the variants' steps are interleaved (one step of
each in turn), so load from other processes falls on all of them alike.

Run: ``python benchmarks/bench_train_step.py [--steps 5] [--threads 2] [--variants original,ours,ours-bf16]``;
prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet

from due_ext.data.builders.sparse import sparse_slices, sparsify
from due_ext.engines.trainer import autocast_dtype
from due_ext.explain.cam import normalized_cam
from due_ext.explain.supervision import ExplanationSupervision
from due_ext.interp.blocks import split_blocks
from due_ext.uncertainty.inference import predict_volume_variance
from due_ext.uncertainty.model import NeuralProcessUncertainty
from due_ext.uncertainty.weights import uncertainty_weights

SIZE = (64, 64, 32)


def demo_network(seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    return ResNet(block="basic", layers=[2, 2, 2, 2], block_inplanes=[16, 32, 64, 128], spatial_dims=3,
                  n_input_channels=1, num_classes=2, conv1_t_size=7, conv1_t_stride=(2, 2, 1), shortcut_type="B",
                  bias_downsample=False)


def make_batch(predictor: torch.nn.Module, seed: int = 0, n_pos: int = 4, n_neg: int = 4):
    """A batch in the trainer's format plus, per positive, what the original loop needs (mask, slices)."""
    rng = np.random.default_rng(seed)
    b = n_pos + n_neg
    image = torch.rand((b, 1, *SIZE), generator=torch.Generator().manual_seed(seed)) * 0.3
    masks = np.zeros((b, *SIZE), np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SIZE], indexing="ij"), -1).astype(np.float32)
    slices = []
    for i in range(n_pos):
        centre = rng.uniform([20, 20, 10], [44, 44, 22])
        radii = rng.uniform([5, 5, 4], [9, 9, 7])
        masks[i] = (((grid - centre) / radii) ** 2).sum(-1) <= 1
        slices.append(sparse_slices(masks[i], 3))
    annotation = np.stack([sparsify(masks[i], slices[i]) if i < n_pos else masks[i] for i in range(b)])
    weights = np.ones((b, *SIZE), np.float32)
    variances = predict_volume_variance(predictor, list(annotation[:n_pos]), slices)
    for i in range(n_pos):
        weights[i] = uncertainty_weights(variances[i], slices[i])
    mask_t = torch.from_numpy(masks)[:, None]
    batch = {
        "image": image + mask_t, "label": torch.tensor([1] * n_pos + [0] * n_neg),
        "annotation": torch.from_numpy(annotation)[:, None], "interpolation": mask_t * 0.9,
        "weights": torch.from_numpy(weights)[:, None], "mask": mask_t,
        "has_annotation": torch.tensor([1.0] * n_pos + [0.0] * n_neg),
    }
    return batch, slices


def ours_step(network, optimizer, supervision, batch, amp: torch.dtype | None = None) -> None:
    """One step as :class:`~due_ext.engines.ExplanationTrainer` takes it: autocast (when ``amp``) around forward
    and loss only."""
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        loss = supervision(network, batch).loss
    loss.backward()
    optimizer.step()


def _batch1_gradcam(network, sample, label):
    """The original's GradCam.get_attention_map: its own forward and backward for one sample."""
    captured = []
    handle = network.layer4.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = network(sample[None])
    finally:
        handle.remove()
    features = captured[0]
    (grads,) = torch.autograd.grad(logits[0, label], features, retain_graph=True)
    alpha = grads.flatten(2).mean(2).detach()
    return normalized_cam(features, alpha, SIZE)[0]


def _original_weights(predictor, annotation, slices):
    """Weights recomputed in the training loop, one uncertainty-predictor call per block (as the release does)."""
    weights = torch.ones(SIZE)
    for block in split_blocks(slices):
        variance = predict_volume_variance(predictor, [annotation], [[block.start, block.stop]])[0]
        w = torch.sigmoid(-torch.from_numpy(variance[..., block.start + 1:block.stop]))
        w = w - w.min()
        weights[..., block.start + 1:block.stop] = w / (w.max() + 1e-6)
    return weights


def original_step(network, optimizer, predictor, batch, slices) -> None:
    optimizer.zero_grad()
    logits = network(batch["image"])
    prediction_loss = F.cross_entropy(logits, batch["label"])
    cams, targets, weights, soft = [], [], [], []
    for i in range(len(slices)):
        cams.append(_batch1_gradcam(network, batch["image"][i], int(batch["label"][i])))
        targets.append(batch["annotation"][i, 0])
        weights.append(_original_weights(predictor, batch["annotation"][i, 0].numpy(), slices[i]))
        soft.append(batch["interpolation"][i, 0])
    cam, target, weight, interp = (torch.stack(t) for t in (cams, targets, weights, soft))
    foreground = (target != 0).float()
    binary = (torch.tanh(5 * (cam - 0.5)) - target).abs() * weight
    loss = prediction_loss + torch.relu((binary * foreground).sum() / foreground.sum())
    loss = loss + (weight * (cam - interp).abs()).mean()
    loss.backward()
    optimizer.step()


def time_interleaved(steps: dict[str, Callable[[], None]], repeat: int) -> dict[str, float]:
    """Median seconds per call of each function after one warm-up call, the calls interleaved."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bf16_loss_difference(supervision: ExplanationSupervision, batch: dict) -> float:
    """Relative difference of the first step's loss under bf16 autocast against float32 (same weights)."""
    network = demo_network()
    with torch.no_grad():
        reference = supervision(network, batch).loss.float()
        with torch.autocast("cpu", dtype=autocast_dtype("bf16", "cpu")):
            low = supervision(network, batch).loss.float()
    return float((low - reference).abs() / reference.abs())


VARIANTS = ("original", "ours", "ours-bf16")
LABELS = {"original": "original per-sample port", "ours": "DUE batched + fused",
          "ours-bf16": "DUE batched + fused, bf16 autocast"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--variants", default="original,ours", help="subset of " + ",".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    predictor = NeuralProcessUncertainty().eval()
    batch, slices = make_batch(predictor)
    supervision = ExplanationSupervision("due")
    steps = {}
    for variant in variants:  # each variant trains its own copy of the same initial network
        network = demo_network()
        optimizer = torch.optim.Adam(network.parameters(), 1e-3)
        if variant == "original":
            steps[variant] = partial(original_step, network, optimizer, predictor, batch, slices)
        else:
            amp = autocast_dtype("bf16" if variant == "ours-bf16" else False, "cpu")
            steps[variant] = partial(ours_step, network, optimizer, supervision, batch, amp)
    seconds = time_interleaved(steps, args.steps)
    n_blocks = sum(len(split_blocks(s)) for s in slices)
    print(f"batch 8 (4 annotated positives, {n_blocks} blocks), {SIZE[0]}x{SIZE[1]}x{SIZE[2]}, "
          f"{args.threads} threads, median of {args.steps} interleaved steps")
    baseline = "original" if "original" in seconds else variants[0]
    print(f"| step | seconds | ratio to {LABELS[baseline]} |\n| --- | --- | --- |")
    for variant, value in seconds.items():
        print(f"| {LABELS[variant]} | {value:.3f} | {seconds[baseline] / value:.2f}x |")
    if "ours-bf16" in seconds:
        print(f"\nbf16 autocast: first-step loss {bf16_loss_difference(supervision, batch):.1e} relative to float32")
    if "original" in seconds:
        start = time.perf_counter()
        predict_volume_variance(predictor, list(batch["annotation"][:4, 0].numpy()), slices)
        per_volume = (time.perf_counter() - start) / 4
        print(f"\none-time weights precomputation in our pipeline: {per_volume * 1e3:.1f} ms per volume")


if __name__ == "__main__":
    main()
