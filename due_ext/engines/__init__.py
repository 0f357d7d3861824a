"""ignite engines of DUE: the explanation-supervised trainer, the explanation evaluator and their metrics."""

from due_ext.engines.cam_images import TensorBoardCamHandler
from due_ext.engines.checkpoints import (
    BestModelSaver,
    EpochSeeder,
    TrainingCheckpoint,
    latest_checkpoint,
    load_network_weights,
    save_state_dict,
)
from due_ext.engines.evaluator import ExplanationEvaluator
from due_ext.engines.metrics import ClassificationMetric, ExplanationMetric
from due_ext.engines.trainer import ExplanationTrainer, NonFiniteLossError
from due_ext.engines.writers import PredictionWriter

__all__ = ["BestModelSaver", "ClassificationMetric", "EpochSeeder", "ExplanationEvaluator", "ExplanationMetric",
           "ExplanationTrainer", "NonFiniteLossError", "PredictionWriter", "TensorBoardCamHandler",
           "TrainingCheckpoint", "latest_checkpoint", "load_network_weights", "save_state_dict"]
