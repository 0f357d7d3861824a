"""Explanations: the CAM formula (:mod:`due_ext.explain.cam`) and differentiable 3D Grad-CAM
(:mod:`due_ext.explain.gradcam`)."""

from due_ext.explain.cam import (
    FLAT_RTOL,
    MINMAX_EPS,
    combine_cam,
    minmax_normalize,
    normalized_cam,
    upsample_cam,
    weighted_channel_sum,
)
from due_ext.explain.gradcam import GradCAMFeatures, find_gap_linear_head, grad_cam, gradcam_features

__all__ = [
    "FLAT_RTOL",
    "MINMAX_EPS",
    "GradCAMFeatures",
    "combine_cam",
    "find_gap_linear_head",
    "grad_cam",
    "gradcam_features",
    "minmax_normalize",
    "normalized_cam",
    "upsample_cam",
    "weighted_channel_sum",
]
