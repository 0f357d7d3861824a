"""Every metric DUE reports, one definition each (docstrings hold the definitions).

- :mod:`due_ext.metrics.prediction`: accuracy, ROC-AUC, PR-AUC (trapezoid and average precision),
  precision, recall, F1, specificity.
- :mod:`due_ext.metrics.explanation`: explanation IoU / precision / recall / F1 at a threshold and swept,
  activation recall, annotation coverage, saliency precision.
- :mod:`due_ext.metrics.localisation`: resolution-robust localisation: pointing game, energy pointing game,
  mask AUROC, IoU at the best threshold.
- :mod:`due_ext.metrics.floors`: the floors every method is compared with: a centred Gaussian blob of the mean
  lesion size and the Grad-CAM of the network at initialisation.
- :mod:`due_ext.metrics.faithfulness`: comprehensiveness and sufficiency.
"""

from due_ext.metrics.explanation import (
    EXPLANATION_THRESHOLDS,
    activation_recall,
    annotation_coverage,
    explanation_scores,
    explanation_sweep,
    saliency_precision,
)
from due_ext.metrics.faithfulness import comprehensiveness, remove_region, sufficiency
from due_ext.metrics.floors import gaussian_blob, initial_cam, initial_network, mean_lesion_voxels, network_cam
from due_ext.metrics.localisation import (
    LOCALISATION_THRESHOLDS,
    best_threshold_iou,
    energy_pointing_game,
    localisation_scores,
    mask_auroc,
    pointing_game,
)
from due_ext.metrics.prediction import (
    average_precision,
    classification_scores,
    pr_auc_trapezoid,
    precision_recall_curve,
    roc_auc,
)

__all__ = [
    "EXPLANATION_THRESHOLDS",
    "LOCALISATION_THRESHOLDS",
    "activation_recall",
    "annotation_coverage",
    "average_precision",
    "best_threshold_iou",
    "classification_scores",
    "comprehensiveness",
    "energy_pointing_game",
    "explanation_scores",
    "explanation_sweep",
    "gaussian_blob",
    "initial_cam",
    "initial_network",
    "localisation_scores",
    "mask_auroc",
    "mean_lesion_voxels",
    "network_cam",
    "pointing_game",
    "pr_auc_trapezoid",
    "precision_recall_curve",
    "remove_region",
    "roc_auc",
    "saliency_precision",
    "sufficiency",
]
