"""Per-volume time of the uncertainty weights: neural-process VAE (one pass) vs diffusion variance (T repeats).

Both paths start from the same sparse annotation and end with the per-voxel weights of the DUE loss:

- ``np``: :func:`due_ext.uncertainty.inference.predict_volume_variance` + :func:`uncertainty_weights`;
- ``diffusion``: :func:`due_ext.interp.diffusion.inference.interpolate_volumes` (the interpolator bundle's
  sampler: its default ``steps`` and ``repeats``) + :func:`uncertainty_weights`.

One process, volumes one at a time (what a data loader asks for), median over volumes after one warm-up each.
Networks come from the bundles' configs; the shipped weights are used when present, otherwise random weights
of the same architecture (the cost does not depend on the weights' values: same blocks, chains and steps).

    python benchmarks/bench_uncertainty.py --n-volumes 8 --threads 1 --repeats 3   # 1 thread: a data-loader worker
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _network(bundle: str):
    from monai.bundle import ConfigParser

    from due_ext.bundles import bundle_root
    from due_ext.engines.checkpoints import load_network_weights

    parser = ConfigParser()
    parser.read_config(f"{bundle_root(bundle)}/inference.json")
    network = parser.get_parsed_content("network_def", instantiate=True).eval()
    weights = Path(bundle_root(bundle)) / "models" / "model.pt"
    if weights.is_file():
        load_network_weights(network, weights)
    sampler = parser.get("sampler")
    return network, weights.is_file(), sampler


def _volumes(n: int, size: str, every_k: int, seed: int) -> list[tuple[np.ndarray, list[int]]]:
    from due_ext.data.builders import build_dataset
    from due_ext.data.datalist import read_datalist
    from due_ext.data.nifti import read_nifti

    with tempfile.TemporaryDirectory() as tmp:
        build_dataset("phantom", tmp, n_pos=max(n, 3), n_neg=3, size=size, every_k=every_k, seed=seed)
        payload = read_datalist(Path(tmp) / "datalist.json")
        items = [i for s in ("training", "validation", "test") for i in payload[s] if "annotation" in i][:n]
        return [(read_nifti(Path(tmp) / i["annotation"])[0], i["annotated_slices"]) for i in items]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best.append(time.perf_counter() - started)
    return min(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-volumes", type=int, default=6)
    parser.add_argument("--size", default="32,32,16", help="phantom size X,Y,Z (the interpolator's demo data)")
    parser.add_argument("--every-k", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per volume and path (min is kept)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from due_ext.interp.blocks import split_blocks
    from due_ext.interp.diffusion.inference import interpolate_volumes
    from due_ext.interp.diffusion.sampling import SamplerSettings
    from due_ext.uncertainty.inference import predict_volume_variance
    from due_ext.uncertainty.weights import uncertainty_weights

    predictor, np_trained, _ = _network("uncertainty")
    interpolator, interp_trained, sampler = _network("interpolator")
    settings = SamplerSettings(**{k: v for k, v in sampler.items() if not str(v).startswith("@")})
    volumes = _volumes(args.n_volumes, args.size, args.every_k, seed=7)

    np_times, diffusion_times, blocks = [], [], []
    for annotation, slices in volumes:
        blocks.append(len(split_blocks(slices)))

        def np_path(annotation=annotation, slices=slices):
            (variance,) = predict_volume_variance(predictor, [annotation], [slices])
            return uncertainty_weights(variance, slices)

        def diffusion_path(annotation=annotation, slices=slices):
            ((_, variance),) = interpolate_volumes(interpolator, [annotation], [slices], settings)
            return uncertainty_weights(variance, slices)

        with torch.no_grad():
            np_times.append(_time(np_path, args.repeats))
            diffusion_times.append(_time(diffusion_path, args.repeats))

    np_median, diffusion_median = statistics.median(np_times), statistics.median(diffusion_times)
    print(f"volumes: {len(volumes)} phantoms {args.size}, every {args.every_k}th slice, blocks per volume "
          f"{statistics.median(blocks)} (median); torch threads {torch.get_num_threads()}")
    print(f"weights: predictor {'shipped' if np_trained else 'random'}, interpolator "
          f"{'shipped' if interp_trained else 'random'}; sampler steps={settings.steps} repeats={settings.repeats} "
          f"bf16={settings.bf16}")
    print("| path | median s / volume | min | max |")
    print("|---|---|---|---|")
    print(f"| NP-VAE weights | {np_median * 1e3:.1f} ms | {min(np_times) * 1e3:.1f} ms | "
          f"{max(np_times) * 1e3:.1f} ms |")
    print(f"| diffusion variance weights | {diffusion_median:.2f} s | {min(diffusion_times):.2f} s | "
          f"{max(diffusion_times):.2f} s |")
    print(f"speed-up (median): {diffusion_median / np_median:.0f}x")


if __name__ == "__main__":
    main()
