"""The imputed uncertainty predictor (DUE paper Sec. 4.3): a neural-process VAE that predicts the diffusion
interpolator's variance in one pass, and the one mapping from variance to the weights of the DUE loss.

- :mod:`.weights`: :func:`uncertainty_weights` (per-block min-max of ``sigmoid(-var)``, 1 on annotated slices).
- :mod:`.model`: :class:`NeuralProcessUncertainty` and its loss.
- :mod:`.targets`: cached diffusion-variance targets of blocks.
- :mod:`.training`: ignite trainer and validator (the bundle's ``train.json``).
- :mod:`.inference`: volumes and datalists in, ``variance`` and ``weights`` out (``inference.json``).
- :mod:`.evaluate`: Spearman with the diffusion variance and AUROC for interpolation errors, with baselines.
"""

from due_ext.uncertainty.model import NeuralProcessUncertainty, neural_process_loss
from due_ext.uncertainty.weights import NORMALIZATIONS, uncertainty_weights

__all__ = ["NORMALIZATIONS", "NeuralProcessUncertainty", "neural_process_loss", "uncertainty_weights"]
