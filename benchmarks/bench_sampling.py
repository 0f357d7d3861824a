"""Diffusion interpolator sampling: our default sampler vs the original way, at equal quality.

- default: every block of every volume and every repeat in one batch per denoising step, DDIM with few
  steps (``--steps``, eta 1), optional bf16 autocast;
- original: one block and one repeat at a time, 100-step DDPM-like sampling (DDIM eta = 1 on 100 steps),
  fp32 (paper Alg. 1 loops over repeats; MCVD samples one video at a time).

Both fill the same held-out masks (the phantom test section by default, every ``--every-k``-th slice kept),
in one process; quality is Dice of the thresholded mean on the missing slices. Also reported: the mean
variance on the missing slices of each sampler (a few-step sampler may shrink the spread; eta = 0 is shown
for comparison). Run from the repository root:

    .venv/bin/python benchmarks/bench_sampling.py [--n-masks 8] [--repeats 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from due_ext.bundles import demo_datalist
from due_ext.data.builders.sparse import sparse_slices, sparsify
from due_ext.interp.blocks import split_blocks
from due_ext.interp.diffusion.inference import default_network, interpolate_volumes, load_interpolator_weights
from due_ext.interp.diffusion.sampling import SamplerSettings
from due_ext.interp.evaluate import load_masks_for_evaluation, shipped_model_path
from due_ext.metrics.segmentation import dice


def quality(results, masks, slices) -> tuple[float, float]:
    dices, variances = [], []
    for (mean, variance), mask, kept in zip(results, masks, slices, strict=True):
        missing = [z for b in split_blocks(kept) for z in b.missing]
        if missing:
            dices.append(dice(mean[..., missing], mask[..., missing]))
            variances.append(float(variance[..., missing].mean()))
    return float(np.mean(dices)), float(np.mean(variances))


def run(name, model, annotations, slices, masks, settings, one_at_a_time=False):
    started = time.perf_counter()
    if one_at_a_time:
        results = []
        for annotation, kept in zip(annotations, slices, strict=True):
            mean = np.zeros(annotation.shape, np.float32)
            samples = []
            for repeat in range(settings.repeats):
                single = SamplerSettings(**{**settings.__dict__, "repeats": 1, "seed": settings.seed * 1000 + repeat})
                parts = [interpolate_volumes(model, [annotation], [[b.start, b.stop]], single)[0][0]
                         for b in split_blocks(kept)]
                samples.append(np.max(parts, axis=0) if parts else np.zeros_like(mean))
            stack = np.stack(samples)
            results.append((stack.mean(0), stack.var(0)))
    else:
        results = interpolate_volumes(model, annotations, slices, settings)
    seconds = time.perf_counter() - started
    d, v = quality(results, masks, slices)
    print(f"{name:<44} {seconds:8.2f} s   Dice(missing) {d:.4f}   mean variance(missing) {v:.5f}", flush=True)
    return seconds, d, v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-masks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--every-k", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=str(shipped_model_path()))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datalist = demo_datalist("phantom", seed=0, n_pos=96, n_neg=3)
    masks = [m for _, m in load_masks_for_evaluation(datalist, ["test"])][: args.n_masks]
    slices = [sparse_slices(m, args.every_k) for m in masks]
    annotations = [sparsify(m, s) for m, s in zip(masks, slices, strict=True)]
    blocks = sum(len(split_blocks(s)) for s in slices)
    print(f"{len(masks)} held-out phantom masks, k={args.every_k}, {blocks} blocks, T={args.repeats} repeats, "
          f"{torch.get_num_threads()} threads")
    model = load_interpolator_weights(default_network(), args.model).eval()
    base = {"repeats": args.repeats, "seed": 0, "max_batch": 64}
    rows = [
        ("original: 1 block x 1 repeat, 100-step eta=1, fp32",
         run("original (1 block/repeat, 100 steps, fp32)", model, annotations, slices, masks,
             SamplerSettings(steps=100, eta=1.0, bf16=False, **base), one_at_a_time=True)),
        ("batched, 100-step eta=1, fp32",
         run("batched, 100 steps, fp32", model, annotations, slices, masks,
             SamplerSettings(steps=100, eta=1.0, bf16=False, **base))),
        (f"batched, {args.steps}-step eta=1, fp32 (default)",
         run(f"batched, {args.steps} steps, fp32", model, annotations, slices, masks,
             SamplerSettings(steps=args.steps, eta=1.0, bf16=False, **base))),
        (f"batched, {args.steps}-step eta=1, bf16",
         run(f"batched, {args.steps} steps, bf16", model, annotations, slices, masks,
             SamplerSettings(steps=args.steps, eta=1.0, bf16=True, **base))),
        (f"batched, {args.steps}-step eta=0 (DDIM), fp32",
         run(f"batched, {args.steps} steps, eta=0, fp32", model, annotations, slices, masks,
             SamplerSettings(steps=args.steps, eta=0.0, bf16=False, **base))),
    ]
    reference = rows[0][1]
    print("\n| sampler | seconds | speed-up | Dice (missing) | mean variance (missing) |\n|---|---|---|---|---|")
    for label, (seconds, d, v) in rows:
        print(f"| {label} | {seconds:.1f} | {reference[0] / seconds:.1f}x | {d:.4f} | {v:.5f} |")


if __name__ == "__main__":
    main()
