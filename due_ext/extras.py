"""Optional extras (``[project.optional-dependencies]`` of pyproject.toml): what each provides, and one clear
error naming the extra to install when a command needs one that is missing.

Checked up front because a missing optional package otherwise fails deep inside a library: MONAI's
``verify_metadata`` without ``jsonschema``, for one, raises ``TypeError: catching classes that do not inherit
from BaseException`` (its ``except ValidationError`` names a placeholder of the missing module).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: import names each extra provides that the package itself imports (test-only packages are not listed)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "export": ("jsonschema",),
    "triton": ("triton",),
}


class MissingExtraError(ImportError):
    """An optional extra a command needs is not installed; the message is one line naming the extra."""


def install_command(extra: str, package_dir: Path | None = None) -> str:
    """The command that installs ``extra`` for this ``due_ext``: into the source checkout it was imported from
    (editable install, as the README builds it), else from the package index."""
    package_dir = Path(__file__).resolve().parent if package_dir is None else package_dir
    checkout = package_dir.parent
    if (checkout / "setup.py").is_file() and (checkout / "pyproject.toml").is_file():
        return f"pip install --no-build-isolation -e '{checkout}[{extra}]'"
    return f"pip install 'due-ext[{extra}]'"


def missing_modules(extra: str) -> list[str]:
    """Import names of ``extra`` that cannot be found (without importing them)."""
    if extra not in EXTRA_MODULES:
        raise ValueError(f"{extra!r} is not an optional extra of due-ext; known: {', '.join(EXTRA_MODULES)}")
    return [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, needed_by: str) -> None:
    """Raise :class:`MissingExtraError` when a module of ``extra`` is missing; ``needed_by`` names what needs it
    (a command or a function) in the message."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(f"{needed_by} needs {', '.join(missing)} from the '{extra}' extra, which is not "
                                f"installed: {install_command(extra)}")
