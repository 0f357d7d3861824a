"""Every metric DUE reports, one definition each (docstrings hold the definitions).

- :mod:`due_ext.metrics.prediction`: accuracy, ROC-AUC, PR-AUC (trapezoid and average precision),
  precision, recall, F1, specificity.
- :mod:`due_ext.metrics.explanation`: explanation IoU / precision / recall / F1 at a threshold and swept,
  activation recall, annotation coverage, saliency precision.
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
from due_ext.metrics.prediction import (
    average_precision,
    classification_scores,
    pr_auc_trapezoid,
    precision_recall_curve,
    roc_auc,
)

__all__ = [
    "EXPLANATION_THRESHOLDS",
    "activation_recall",
    "annotation_coverage",
    "average_precision",
    "classification_scores",
    "comprehensiveness",
    "explanation_scores",
    "explanation_sweep",
    "pr_auc_trapezoid",
    "precision_recall_curve",
    "remove_region",
    "roc_auc",
    "saliency_precision",
    "sufficiency",
]
