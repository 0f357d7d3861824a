"""``python -m due_ext bundle export NAME --out DIR``: a repository bundle as a self-contained model-zoo bundle.

Layout written (MONAI bundle specification, model-zoo conventions)::

    DIR/configs/{train,inference,...}.json, metadata.json, logging.conf
    DIR/models/model.pt                 (+ extra models a config needs)
    DIR/scripts/due_ext/...             vendored Python (see :mod:`due_ext.export.vendor`)
    DIR/docs/README.md, docs/data_license.txt
    DIR/LICENSE
    DIR/large_files.yml                 only when a file is over the model zoo's 25 MB limit

The export is written to a temporary sibling folder and renamed into place, so a failed export never leaves a
half-written bundle behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from due_ext.bundles import bundle_root
from due_ext.export.metadata import export_metadata, verify_bundle_metadata
from due_ext.export.specs import COMMON_OVERRIDES, SPECS, ExportSpec
from due_ext.export.vendor import VENDORED_PACKAGE, vendor_package
from due_ext.extras import require_extra

#: the model zoo keeps files above this size out of git and lists them in large_files.yml
LARGE_FILE_MB = 25.0

_DUE_EXT_REF = re.compile(r"(?<![\w.])due_ext(?=\b)")


def _rewrite_value(value: Any) -> Any:
    """Every ``due_ext`` reference in a config value (imports, ``_target_``, expressions) -> the vendored copy."""
    if isinstance(value, str):
        return _DUE_EXT_REF.sub(VENDORED_PACKAGE, value)
    if isinstance(value, list):
        return [_rewrite_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _rewrite_value(v) for k, v in value.items()}
    return value


def _referenced_modules(config: Any) -> set[str]:
    """``due_ext`` modules a config imports or names (``$import due_ext.x``, ``due_ext.x.Class``)."""
    found: set[str] = set()
    if isinstance(config, str):
        for match in re.finditer(r"(?<![\w.])(due_ext(?:\.\w+)*)", config):
            found.add(match.group(1))
    elif isinstance(config, list):
        for value in config:
            found |= _referenced_modules(value)
    elif isinstance(config, dict):
        for value in config.values():
            found |= _referenced_modules(value)
    return found


def _module_prefixes(names: set[str]) -> set[str]:
    # ``due_ext.engines.ExplanationTrainer`` names a class: keep every dotted prefix, the closure drops
    # the ones that are not modules
    return {".".join(name.split(".")[:i]) for name in names for i in range(1, len(name.split(".")) + 1)}


def export_config(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A repository config rewritten for the exported bundle."""
    exported = _rewrite_value(config)
    imports = exported.get("imports")
    root_import = f"$import {VENDORED_PACKAGE.split('.')[0]}"
    if isinstance(imports, list) and root_import not in imports and any(VENDORED_PACKAGE in i for i in imports):
        # MONAI binds `$import a.b` to the name "a.b"; expressions spell `scripts.due_ext.x`, so bind `scripts`
        exported["imports"] = [root_import, *imports]
    for key, value in {**COMMON_OVERRIDES, **overrides}.items():
        if key in exported or key not in COMMON_OVERRIDES:
            exported[key] = value
    return exported


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=4) + "\n")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_large_files(root: Path, threshold_mb: float = LARGE_FILE_MB) -> list[str]:
    """List files over ``threshold_mb`` in ``root/large_files.yml`` (model-zoo format); returns their paths.

    The ``url`` of each entry is empty: it is where the file is uploaded when the bundle is published.
    """
    large = sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size > threshold_mb * 2**20)
    if not large:
        return []
    lines = ["large_files:"]
    for path in large:
        rel = path.relative_to(root).as_posix()
        lines += [f'  - path: "{rel}"', '    url: ""', f'    hash_val: "{_md5(path)}"', '    hash_type: "md5"']
    (root / "large_files.yml").write_text("\n".join(lines) + "\n")
    return [p.relative_to(root).as_posix() for p in large]


def _readme(spec: ExportSpec, source: Path) -> str:
    original = (source / "docs" / "README.md").read_text() if (source / "docs" / "README.md").is_file() else ""
    title, _, rest = original.partition("\n")
    header = title if title.startswith("#") else f"# {spec.name}"
    return (
        f"{header}\n\n## Exported bundle\n\nThis folder is the `{spec.name}` bundle of DUE exported in the "
        "MONAI model-zoo layout by `python -m due_ext bundle export`. Paths in the sections after this one "
        f"refer to the repository (`bundles/{spec.name}/x.json` is `configs/x.json` here).\n\n"
        f"{spec.usage}\n{rest.lstrip()}"
    )


def _weights(spec: ExportSpec, source: Path, model: str | os.PathLike | None) -> Path:
    path = Path(model) if model is not None else source / "models" / spec.weights
    if not path.is_file():
        # bundles/due/models/ holds a training run's output (not in git); the two upstream models are shipped
        raise FileNotFoundError(
            f"{path}: no weights to export for {spec.name!r}; train the bundle first "
            f"(python -m monai.bundle run --config_file bundles/{spec.name}/train.json) "
            "or pass model=PATH (--model PATH)"
        )
    return path


def _build(spec: ExportSpec, out: Path, large_file_mb: float, model: str | os.PathLike | None) -> dict[str, Any]:
    source = Path(bundle_root(spec.name))
    weights = _weights(spec, source, model)
    (out / "configs").mkdir(parents=True)
    (out / "models").mkdir()
    (out / "docs").mkdir()
    modules: set[str] = set()
    configs = sorted(p for p in source.glob("*.json") if p.name != "metadata.json")
    for path in configs:
        config = json.loads(path.read_text())
        modules |= _referenced_modules(config)
        _write_json(out / "configs" / path.name, export_config(config, spec.overrides.get(path.name, {})))
    if (source / "logging.conf").is_file():
        shutil.copy2(source / "logging.conf", out / "configs" / "logging.conf")
    vendored = vendor_package(_module_prefixes(modules), out / "scripts")
    metadata = export_metadata(json.loads((source / "metadata.json").read_text()), spec, vendored)
    _write_json(out / "configs" / "metadata.json", metadata)
    shutil.copy2(weights, out / "models" / "model.pt")
    for target, (bundle, name) in spec.extra_models.items():
        shutil.copy2(Path(bundle_root(bundle)) / "models" / name, out / "models" / target)
    for doc in (source / "docs").glob("*"):
        if doc.is_file() and doc.name != "README.md":
            shutil.copy2(doc, out / "docs" / doc.name)
    (out / "docs" / "README.md").write_text(_readme(spec, source))
    (out / "docs" / "data_license.txt").write_text(spec.data_license)
    shutil.copy2(source / "LICENSE", out / "LICENSE")
    verify_bundle_metadata(out / "configs" / "metadata.json")
    large = write_large_files(out, large_file_mb)
    return {"configs": [p.name for p in configs], "modules": vendored, "large_files": large}


def _zip(folder: Path, name: str) -> Path:
    """``<folder>.zip`` holding ``<name>/...`` (model-zoo archives carry the bundle folder at the top)."""
    archive = folder.with_suffix(".zip")
    tmp = archive.with_name(f".{archive.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                zf.write(path, f"{name}/{path.relative_to(folder).as_posix()}")
    os.replace(tmp, archive)
    return archive


def export_bundle(
    name: str,
    out: str | os.PathLike,
    zip: bool = False,
    large_file_mb: float = LARGE_FILE_MB,
    model: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Export ``bundles/<name>`` to the folder ``out`` (replaced if it exists); with ``zip`` also ``out.zip``.

    ``model``: the weights to ship as ``models/model.pt`` (a state dict of the bundle's ``network_def``);
    default ``bundles/<name>/models/model.pt`` (``bundles/due/models/due/model.pt`` for ``due``: a DUE training
    run writes ``models/<run_name>/model.pt``).

    Returns a summary: ``{"bundle", "path", "configs", "modules", "large_files", "zip"}``. Raises
    :class:`~due_ext.extras.MissingExtraError` before writing anything when the ``export`` extra is missing.
    """
    if name not in SPECS:
        raise ValueError(f"bundle {name!r} is unknown; choose one of {', '.join(SPECS)}")
    # the export ends by validating the metadata: fail before writing anything when that cannot run
    require_extra("export", "exporting a bundle (python -m due_ext bundle export)")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        summary = _build(SPECS[name], staging / "bundle", large_file_mb, model)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging / "bundle", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    archive = _zip(out, name) if zip else None
    return {"bundle": name, "path": str(out), **summary, "zip": None if archive is None else str(archive)}
