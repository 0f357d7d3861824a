"""Keys of a DUE datalist item (Decathlon style), in one place.

``image``            NIfTI volume, ``(X, Y, Z)``.
``label``            0 (no lesion) or 1 (lesion).
``annotation``       NIfTI binary mask on the image grid; required for positives. Only the slices listed
                     in ``annotated_slices`` carry information, whatever the file holds elsewhere (our
                     builders write zeros there).
``annotated_slices`` Z indices a person actually drew (sorted, unique, each holding foreground, except those
                     in ``empty_slices``).
``empty_slices``     optional: annotated slices that were looked at and left empty (no foreground there).
``interpolation``    derived: soft mask in [0, 1] filled by an interpolator.
``variance``         derived: per-voxel variance of the interpolation.
``weights``          derived: per-voxel uncertainty weights in [0, 1] (1 on annotated slices).
``diffusion_weights`` derived: the same mapping applied to the interpolator's own (diffusion) variance instead of
                     the neural process's (the ``due_diffusion_variance`` ablation).
``mask``             full 3D ground-truth lesion mask where known (synthetic data); evaluation only.
"""

from __future__ import annotations

IMAGE = "image"
LABEL = "label"
ANNOTATION = "annotation"
ANNOTATED_SLICES = "annotated_slices"
EMPTY_SLICES = "empty_slices"
INTERPOLATION = "interpolation"
VARIANCE = "variance"
WEIGHTS = "weights"
DIFFUSION_WEIGHTS = "diffusion_weights"
#: Full 3D ground-truth lesion mask (synthetic data only). Read by evaluation metrics, never by training.
MASK = "mask"

#: Keys whose values are NIfTI file paths, in the order they are checked.
VOLUME_KEYS = (IMAGE, ANNOTATION, MASK, INTERPOLATION, VARIANCE, WEIGHTS, DIFFUSION_WEIGHTS)
#: Volume keys that must share the image's grid (shape and affine).
GRID_KEYS = (ANNOTATION, MASK, INTERPOLATION, VARIANCE, WEIGHTS, DIFFUSION_WEIGHTS)
