"""Helpers of the export and deploy tests."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]


def random_due_weights(path: Path, seed: int = 0) -> Path:
    """A state dict of the DUE bundle's ``network_def`` with a seeded random init, saved to ``path``.

    ``bundles/due/models/`` is a training run's output (ignored by git), so a fresh clone has no DUE weights;
    the export tests check the export itself, which needs weights of the right architecture, not trained ones.
    """
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "due" / "inference.json"))
    parser["imports"] = []  # network_def needs only MONAI
    torch.manual_seed(seed)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path
