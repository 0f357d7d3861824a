"""How well can a Grad-CAM of each ResNet layer outline the test lesions at all? (explanation-IoU ceiling)

For each layer of the DUE bundle's network, the feature grid it produces at the data's crop size is measured with a
forward hook, and the oracle map of :mod:`due_ext.metrics.cam_ceiling` (the mask pooled onto that grid, then the
Grad-CAM upsample + min-max + threshold) is scored against every test positive's mask. Prints a markdown table.

    python experiments/cam_ceiling.py                       # the lung-ct demo set of experiments/table1.yaml
    python experiments/cam_ceiling.py --dataset bounded     # the lesion-bounded demo set (bundles/due/bounded.json)
    python experiments/cam_ceiling.py --datalist PATH --section test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def feature_grids(layers: list[str], shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Spatial size of each ``layers`` output of the DUE bundle's ``network_def`` for one ``shape`` input."""
    from monai.bundle import ConfigParser

    from due_ext.bundles import bundle_root

    parser = ConfigParser()
    parser.read_config(str(Path(bundle_root("due")) / "train.json"))
    network = parser.get_parsed_content("network_def").eval()
    grids: dict[str, tuple[int, ...]] = {}
    hooks = [getattr(network, name).register_forward_hook(
        lambda _m, _i, out, name=name: grids.__setitem__(name, tuple(out.shape[2:]))) for name in layers]
    with torch.no_grad():
        network(torch.zeros(1, 1, *shape))
    for hook in hooks:
        hook.remove()
    return grids


def main() -> None:
    from due_ext.bundles import demo_datalist
    from due_ext.interp.evaluate import load_masks_for_evaluation
    from due_ext.metrics.cam_ceiling import oracle_cam_iou

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datalist", help="datalist with a 'mask' per positive (default: the --dataset demo set)")
    parser.add_argument("--dataset", default="lung-ct", help="demo dataset read without --datalist (e.g. bounded)")
    parser.add_argument("--section", default="test")
    parser.add_argument("--layers", default="layer1,layer2,layer3,layer4")
    parser.add_argument("--thresholds", default="0.3,0.5,0.7")
    args = parser.parse_args()
    datalist = Path(args.datalist or demo_datalist(args.dataset, seed=0))
    # the lesion masks of the section (negatives have empty masks and are skipped)
    masks = torch.stack([torch.from_numpy(mask.astype(np.float32))
                         for _, mask in load_masks_for_evaluation(datalist, [args.section])])
    thresholds = [float(t) for t in args.thresholds.split(",")]
    grids = feature_grids(args.layers.split(","), tuple(masks.shape[1:]))
    print(f"{datalist} [{args.section}]: {len(masks)} positives, crop {tuple(masks.shape[1:])}, lesion = "
          f"{100 * masks.mean().item():.2f} % of the crop on average\n")
    print("| layer | grid | " + " | ".join(f"oracle IoU @ {t} (%)" for t in thresholds) + " |")
    print("|---|---|" + "---|" * len(thresholds))
    for name, grid in grids.items():
        values = [100 * oracle_cam_iou(masks, grid, t) for t in thresholds]
        print(f"| {name} | {'x'.join(map(str, grid))} | "
              + " | ".join(f"{v.mean():.2f} ± {v.std():.2f}" for v in values) + " |")


if __name__ == "__main__":
    main()
