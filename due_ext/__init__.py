"""DUE: dynamic uncertainty-aware explanation supervision for 3D medical images, built on MONAI.

The package holds everything the bundles wire together: the data layer (:mod:`due_ext.data`), the fused
kernels (:mod:`due_ext.ops`, compiled in ``due_ext._C``), Grad-CAM and explanation losses
(:mod:`due_ext.explain`), the interpolator, the uncertainty predictor and the ignite engines.
"""

from __future__ import annotations

from due_ext._backends import backends

__version__ = "0.1.0"

__all__ = ["__version__", "backends"]
