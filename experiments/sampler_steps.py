"""Why does the interpolator's long sampler (100 DDIM steps) score lower Dice than the 10-step default?

Fills the held-out phantom masks (the demo set's test section, every ``--every-k``-th slice kept) with the shipped
interpolator and, per number of steps (eta 1), reports on the missing slices:

- Dice of the thresholded mean of ``R`` repeats (what ``python -m due_ext interp evaluate`` scores), for each ``R``;
- Dice of single samples (``R = 1``, ``--single-seeds`` seeds, averaged): is one sample worse, or only the mean?
  and how many single samples leave a lesion's whole gap empty (nothing drawn on any missing slice);
- the mean per-voxel variance of the ``R``-repeat run (the diversity of the samples) and the filled area relative
  to the true area.

Prints a markdown table. Run from the repository root (about 10 min on one core with the defaults):

    python experiments/sampler_steps.py [--every-k 3] [--steps 10,100] [--repeats 8,32] [--single-seeds 6]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def missing_slice_scores(results, masks, missing) -> dict[str, float]:
    """On the missing slices: mean Dice over masks, filled/true area, mean variance, and the number of masks whose
    fill is empty there although the truth is not."""
    from due_ext.metrics.segmentation import dice

    dices, filled, true, variances, empty = [], 0.0, 0.0, [], 0
    for (mean, variance), mask, gone in zip(results, masks, missing, strict=True):
        if not gone:
            continue
        drawn = mean[..., gone] > 0.5
        dices.append(dice(mean[..., gone], mask[..., gone]))
        filled += float(drawn.sum())
        true += float(mask[..., gone].sum())
        variances.append(float(variance[..., gone].mean()))
        empty += int(not drawn.any() and mask[..., gone].any())
    return {"dice": float(np.mean(dices)), "area": filled / max(true, 1.0), "variance": float(np.mean(variances)),
            "empty": empty, "masks": len(dices)}


def main() -> None:
    from due_ext.bundles import demo_datalist
    from due_ext.data.builders.sparse import sparse_slices, sparsify
    from due_ext.interp.blocks import split_blocks
    from due_ext.interp.diffusion.inference import default_network, interpolate_volumes, load_interpolator_weights
    from due_ext.interp.diffusion.sampling import SamplerSettings
    from due_ext.interp.evaluate import load_masks_for_evaluation, shipped_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every-k", type=int, default=3)
    parser.add_argument("--steps", default="10,100")
    parser.add_argument("--repeats", default="8,32")
    parser.add_argument("--single-seeds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    datalist = demo_datalist("phantom", seed=0, n_pos=96, n_neg=3)
    masks = [m for _, m in load_masks_for_evaluation(datalist, ["test"])]
    slices = [sparse_slices(m, args.every_k) for m in masks]
    annotations = [sparsify(m, s) for m, s in zip(masks, slices, strict=True)]
    missing = [[z for b in split_blocks(s) for z in b.missing] for s in slices]
    model = load_interpolator_weights(default_network(), shipped_model_path()).eval()
    print(f"{datalist} [test]: {len(masks)} phantom masks, k = {args.every_k}, eta 1, "
          f"{torch.get_num_threads()} threads\n")

    def fill(steps: int, repeats: int, seed: int):
        settings = SamplerSettings(steps=steps, eta=1.0, repeats=repeats, seed=seed)
        return missing_slice_scores(interpolate_volumes(model, annotations, slices, settings), masks, missing)

    print("| steps | Dice, mean of R repeats | single-sample Dice (R = 1) | single samples with an empty gap | "
          "filled / true area (mean of R) | mean variance (missing slices) | seconds |")
    print("|---|---|---|---|---|---|---|")
    for steps in (int(s) for s in args.steps.split(",")):
        started = time.perf_counter()
        by_repeats = {int(r): fill(steps, int(r), seed=0) for r in args.repeats.split(",")}
        singles = [fill(steps, 1, seed=100 + i) for i in range(args.single_seeds)]
        seconds = time.perf_counter() - started
        dices = [single["dice"] for single in singles]
        cells = [", ".join(f"R={r}: {m['dice']:.3f}" for r, m in by_repeats.items()),
                 f"{np.mean(dices):.3f} ± {np.std(dices):.3f} ({len(singles)} seeds)",
                 f"{sum(x['empty'] for x in singles)} of {sum(x['masks'] for x in singles)}",
                 ", ".join(f"R={r}: {m['area']:.2f}" for r, m in by_repeats.items()),
                 ", ".join(f"R={r}: {m['variance']:.4f}" for r, m in by_repeats.items()), f"{seconds:.0f}"]
        print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
