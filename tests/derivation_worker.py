"""Run by tests/test_sharded_derivation.py under ``torch.distributed.run``: one process of a derivation shared by
several (gloo). Writes, per rank, the names of the items this process derived, then the derived datalist's path.

Usage: python -m torch.distributed.run --nproc_per_node N tests/derivation_worker.py DATALIST OUT_JSON_PREFIX
"""

import json
import sys

import torch.distributed as dist

import due_ext.interp.diffusion.inference as interp_inference
import due_ext.uncertainty.inference as uncertainty_inference
from due_ext import bundles


def main(datalist: str, out_prefix: str) -> None:
    dist.init_process_group("gloo")
    derived: dict[str, list[int]] = {"interpolator": [], "uncertainty": []}

    def counting(step, function):
        def wrapper(network, annotations, *args, **kwargs):
            derived[step].append(len(annotations))
            return function(network, annotations, *args, **kwargs)
        return wrapper

    interp_inference.interpolate_volumes = counting("interpolator", interp_inference.interpolate_volumes)
    uncertainty_inference.predict_volume_variance = counting("uncertainty",
                                                             uncertainty_inference.predict_volume_variance)
    result = bundles.derive_uncertainty_keys(datalist)
    with open(f"{out_prefix}{dist.get_rank()}.json", "w") as handle:
        json.dump({"items_derived": {k: sum(v) for k, v in derived.items()}, "datalist": result}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
