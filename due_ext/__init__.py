"""DUE: dynamic uncertainty-aware explanation supervision for 3D medical images, built on MONAI.

The package holds everything the bundles wire together: the data layer (:mod:`due_ext.data`), the fused
kernels (:mod:`due_ext.ops`, compiled in ``due_ext._C``), Grad-CAM and explanation losses
(:mod:`due_ext.explain`), the interpolator, the uncertainty predictor and the ignite engines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from due_ext._backends import BackendStatus

__version__ = "0.1.0"


def backends() -> dict[str, BackendStatus]:
    """Report every kernel backend (see :func:`due_ext._backends.backends`). Imported on call so that
    ``import due_ext`` (and ``python -m due_ext --help``) does not pay for importing torch."""
    from due_ext._backends import backends as report

    return report()

__all__ = ["__version__", "backends"]
