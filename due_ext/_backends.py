"""Which kernel backends this installation can run, and why the others cannot.

The public ops (:mod:`due_ext.ops`) choose among these by the tensor's device; ``DUE_EXT_BACKEND``
forces one (``cpp``, ``cuda``, ``triton`` or ``reference``) for tests and benchmarks.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from due_ext.extras import install_command

BACKEND_ENV = "DUE_EXT_BACKEND"
BACKEND_NAMES = ("cpp", "cuda", "triton", "reference")


@dataclass(frozen=True)
class BackendStatus:
    """Availability of one kernel backend: ``available`` and, when not, ``reason``."""

    name: str
    available: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.reason})"


def build_hint(package_dir: Path | None = None) -> str:
    """How to get the compiled kernels, for where this ``due_ext`` was imported from: a source checkout gets
    the build command for that checkout; a copy without ``setup.py`` next to it (an exported bundle's
    ``scripts/``) is told to install the package, since it cannot build one."""
    package_dir = Path(__file__).resolve().parent if package_dir is None else package_dir
    source_tree = package_dir.parent
    if (source_tree / "setup.py").is_file():
        return f"build it with `pip install --no-build-isolation -e {source_tree}`"
    return (f"{package_dir} is a copy without its build files (e.g. an exported bundle's scripts/); install "
            "the due-ext package from its source tree (`pip install --no-build-isolation .`) for the C++/CUDA "
            "kernels")


@functools.lru_cache(maxsize=1)
def load_extension() -> tuple[bool, str]:
    """Import ``due_ext._C`` once; returns ``(loaded, reason)``."""
    try:
        importlib.import_module("due_ext._C")
    except ImportError as err:
        return False, f"due_ext._C is not built ({err}); {build_hint()}"
    return True, "due_ext._C loaded"


def _cpp_status() -> BackendStatus:
    loaded, reason = load_extension()
    if not loaded:
        return BackendStatus("cpp", False, reason)
    openmp = torch.ops.due_ext.compiled_with_openmp()
    return BackendStatus("cpp", True, f"C++ kernels, OpenMP {'on' if openmp else 'off'}, "
                                      f"{torch.get_num_threads()} threads")


def _cuda_status() -> BackendStatus:
    loaded, reason = load_extension()
    if not loaded:
        return BackendStatus("cuda", False, reason)
    if not torch.ops.due_ext.compiled_with_cuda():
        why = ("torch is a CPU build" if torch.version.cuda is None
               else "the extension was built without CUDA (no GPU or nvcc at build time; rebuild with FORCE_CUDA=1)")
        return BackendStatus("cuda", False, f"CUDA kernels not compiled: {why}")
    if not torch.cuda.is_available():
        return BackendStatus("cuda", False, "CUDA kernels compiled, but no GPU is visible")
    return BackendStatus("cuda", True, f"CUDA kernels on {torch.cuda.get_device_name()}")


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (slowly), for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> BackendStatus:
    try:
        import triton  # noqa: F401
    except ImportError:
        return BackendStatus("triton", False, f"triton is not installed ({install_command('triton')})")
    if triton_interpreting():
        return BackendStatus("triton", True, "Triton interpreter (TRITON_INTERPRET=1), CPU tensors")
    if not torch.cuda.is_available():
        return BackendStatus("triton", False, "triton installed, but no GPU is visible")
    return BackendStatus("triton", True, f"Triton kernels on {torch.cuda.get_device_name()}")


@functools.lru_cache(maxsize=2)
def _backend_statuses(interpreting: bool) -> dict[str, BackendStatus]:
    # cached: the public ops consult it on every call (sampling loops call an op per step); the only input
    # that may change within a process is TRITON_INTERPRET, which is part of the cache key
    return {
        "cpp": _cpp_status(),
        "cuda": _cuda_status(),
        "triton": _triton_status(),
        "reference": BackendStatus("reference", True, "pure PyTorch composition (test oracle)"),
    }


def backends() -> dict[str, BackendStatus]:
    """Report every kernel backend: ``{name: BackendStatus(name, available, reason)}``.

    Example::

        >>> import due_ext
        >>> print(due_ext.backends()["cpp"])
        cpp: available (C++ kernels, OpenMP on, 2 threads)
    """
    return dict(_backend_statuses(triton_interpreting()))


def forced_backend() -> str | None:
    """The backend named by ``DUE_EXT_BACKEND``, validated; ``None`` when unset."""
    name = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not name:
        return None
    if name not in BACKEND_NAMES:
        raise ValueError(f"{BACKEND_ENV}={name!r} is not a backend; choose one of {', '.join(BACKEND_NAMES)}")
    return name
