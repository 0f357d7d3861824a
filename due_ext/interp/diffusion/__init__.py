"""Diffusion interpolator (DUE paper Sec. 4.2-4.3): conditional 2D DDPM on lesion-centred mask crops.

- :mod:`.model`: the conditional UNet (previous/next slice channels, gap position embedding).
- :mod:`.crops`: crop around the foreground, paste back (any slice size).
- :mod:`.training`: slice-triple dataset and ignite training pieces.
- :mod:`.sampling`: batched autoregressive gap filling with repeats (mean and variance).
- :mod:`.inference`: volumes and datalists in, ``interpolation`` and ``variance`` out.
"""

from due_ext.interp.diffusion.inference import DiffusionInterpolation, interpolate_volumes, load_interpolator_weights
from due_ext.interp.diffusion.model import SliceInterpolationUNet, drop_conditions, noise_schedule
from due_ext.interp.diffusion.sampling import GapJob, SamplerSettings, sample_gaps

__all__ = [
    "DiffusionInterpolation",
    "GapJob",
    "SamplerSettings",
    "SliceInterpolationUNet",
    "drop_conditions",
    "interpolate_volumes",
    "load_interpolator_weights",
    "noise_schedule",
    "sample_gaps",
]
