"""Backend choice for the public ops: the fastest one available for the tensor's device.

Order: CUDA tensors use ``cuda``, else ``triton``; CPU tensors use ``cpp``. ``DUE_EXT_BACKEND`` forces
one (tests, benchmarks) and fails loudly if it cannot run. The pure-PyTorch ``reference`` is used only
when nothing compiled is present (e.g. an exported bundle run without our package built), with a warning.
"""

from __future__ import annotations

import functools
import logging

import torch

from due_ext._backends import BACKEND_ENV, backends, forced_backend

logger = logging.getLogger("due_ext.ops")


@functools.cache
def _warn_reference_once(op: str, device_type: str, why: str) -> None:
    logger.warning("due_ext.ops.%s: no compiled backend for %s tensors (%s); using the slow PyTorch "
                   "reference", op, device_type, why)


def select_backend(op: str, device: torch.device) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``."""
    status = backends()
    forced = forced_backend()
    if forced is not None:
        if not status[forced].available:
            raise RuntimeError(f"{BACKEND_ENV}={forced} but that backend is unavailable: {status[forced].reason}")
        if forced == "cuda" and device.type != "cuda":
            raise RuntimeError(f"{BACKEND_ENV}=cuda but the tensors are on {device}")
        if forced == "cpp" and device.type != "cpu":
            raise RuntimeError(f"{BACKEND_ENV}=cpp but the tensors are on {device}")
        return forced
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            if status[name].available:
                return name
        why = f"{status['cuda'].reason}; {status['triton'].reason}"
    elif device.type == "cpu":
        if status["cpp"].available:
            return "cpp"
        why = status["cpp"].reason
    else:
        why = f"device type {device.type!r} has no kernels"
    _warn_reference_once(op, device.type, why)
    return "reference"
