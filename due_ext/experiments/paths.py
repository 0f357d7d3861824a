"""Paths in what the experiment runner writes: never absolute, so committed results name no machine's folders.

Three kinds, each relative to a root that is recorded or implied:

- files of the experiment folder ``OUT`` (training subsets, cell folders): relative to ``OUT``;
- volumes named by a training subset: relative to the *data root*, the deepest folder holding the base datalist
  and every volume it names (:func:`data_root`; for a demo dataset its cache folder, which also holds DUE's derived
  volumes). A cell hands the bundle a local copy with absolute paths
  (:func:`due_ext.experiments.datalists.resolved_datalist`);
- the data root itself, the base datalist, the experiment file and the bundle: written by :func:`portable_path` as
  ``<cache>/...`` below the cache folder (:func:`due_ext.data.cache.cache_dir`, ``$DUE_EXT_CACHE``) or
  ``<repository>/...`` below this checkout, and read back by :func:`resolve_portable`. A path below neither (a
  datalist kept elsewhere on this machine) cannot be made portable and stays absolute.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def _roots() -> dict[str, Callable[[], Path]]:
    from due_ext.bundles import repository_root
    from due_ext.data.cache import cache_dir

    # the cache first: it may lie inside the checkout (DUE_EXT_CACHE=./cache), and then it is the closer root
    return {"<cache>": cache_dir, "<repository>": repository_root}


def portable_path(path: str | os.PathLike) -> str:
    """``<cache>/rest`` or ``<repository>/rest`` for a path below one of them (resolved), else the absolute
    path; a relative ``path`` is taken from the working directory."""
    resolved = Path(path).resolve()
    for token, root in _roots().items():
        try:
            rest = resolved.relative_to(root().resolve())
        except ValueError:
            continue
        return token if rest == Path() else f"{token}/{rest.as_posix()}"
    return str(resolved)


def resolve_portable(text: str) -> Path:
    """The absolute path of a :func:`portable_path` string on this machine."""
    head, _, rest = text.partition("/")
    root = _roots().get(head)
    if root is None:
        if not Path(text).is_absolute():
            raise ValueError(f"{text!r}: neither '<cache>/...', '<repository>/...' nor an absolute path")
        return Path(text)
    return root().resolve() / rest


def data_root(datalist: str | os.PathLike, volumes: list[str]) -> Path:
    """The deepest folder holding ``datalist`` and every path in ``volumes`` (absolute, or relative to the
    datalist's folder)."""
    folder = Path(datalist).resolve().parent
    paths = [str(folder)] + [str((folder / v).resolve()) for v in volumes]
    return Path(os.path.commonpath(paths))
