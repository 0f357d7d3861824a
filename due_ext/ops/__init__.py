"""Fused ops of DUE (C++ / CUDA / Triton kernels with a pure-PyTorch reference each); see ``due_ext.backends()``."""

from due_ext.ops.ddim import ddim_step as ddim_step
from due_ext.ops.explanation_loss import explanation_loss as explanation_loss
