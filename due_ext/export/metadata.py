"""``configs/metadata.json`` of an exported bundle, and its check against the bundle metadata schema.

The model zoo validates metadata against ``meta_schema_20220324.json``, a release asset of
Project-MONAI/MONAI-extra-test-data (0.8.1) whose MD5 MONAI's own tests pin (:data:`OFFICIAL_SCHEMA_MD5`).
Release assets are not in any git history we can read, and tests must run offline, so the repository stores
the closest public text instead: ``schemas/meta_schema_monai_9be9daa.json``, MONAI's copy of the same schema
from the week it was written (MONAI commit 9be9daa, ``tests/testing_data/schema.json``, Apache-2.0; see
``schemas/README.md``). It is stricter than the released file in two field names (``authorship``,
``dataset_dir``), so exported metadata carries both spellings and passes either. Where the network is
reachable, :func:`verify_bundle_metadata` with ``official=True`` downloads the released file, checks its MD5
and validates against it.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from due_ext.export.specs import ExportSpec
from due_ext.export.vendor import third_party_requirements

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
#: the stored schema (see the module docstring)
STORED_SCHEMA = SCHEMA_DIR / "meta_schema_monai_9be9daa.json"
OFFICIAL_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
)
OFFICIAL_SCHEMA_MD5 = "662135097106b71067cd1fc657f8720f"

#: packages the exported configs use without the vendored code importing them
CONFIG_PACKAGES = {"interpolator": ("einops",)}
#: optional packages per bundle beyond its repository metadata: ONNX export and runtime of the DUE classifier
OPTIONAL_PACKAGES = {"due": ("onnx", "onnxruntime")}


def distribution_version(name: str) -> str:
    """Installed version of a distribution as published on PyPI (local build tags like ``+cpu`` dropped)."""
    return importlib_metadata.version(name).split("+")[0]


def _rename_io(section: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    renamed = {}
    for key, value in section.items():
        new = names.get(key, key)
        if new != key:
            value = {**value, "channel_def": {k: f"{key}: {v}" for k, v in value.get("channel_def", {}).items()}}
        renamed[new] = value
    return renamed


def export_metadata(source: dict[str, Any], spec: ExportSpec, vendored: Iterable[str]) -> dict[str, Any]:
    """The repository's ``metadata.json`` for the exported bundle: versions of this environment, the
    requirements of the vendored code instead of ``due-ext``, schema field names, I/O names the schema wants."""
    meta = copy.deepcopy(source)
    meta["schema"] = OFFICIAL_SCHEMA_URL
    if meta.get("version") not in meta.get("changelog", {}):
        raise ValueError(f"bundles/{spec.name}/metadata.json: changelog has no entry for version {meta.get('version')}")
    meta["monai_version"] = distribution_version("monai")
    meta["pytorch_version"] = distribution_version("torch")
    meta["numpy_version"] = distribution_version("numpy")
    required = {
        name: distribution_version(name) for name in meta.get("required_packages_version", {}) if name != "due-ext"
    }  # the vendored scripts/due_ext replaces the package
    required.update(third_party_requirements(vendored))
    required.update({name: distribution_version(name) for name in CONFIG_PACKAGES.get(spec.name, ())})
    meta["required_packages_version"] = dict(sorted(required.items(), key=lambda item: item[0].lower()))
    optional = {}
    for name in (*meta.get("optional_packages_version", {}), *OPTIONAL_PACKAGES.get(spec.name, ())):
        try:
            optional[name] = distribution_version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    meta["optional_packages_version"] = optional
    # field names of the stored 2022 schema, kept beside the model zoo's
    meta["authorship"] = meta.get("authors", "")
    meta.setdefault("dataset_dir", "~/.cache/due_ext/datasets (built on first use; override --datalist)")
    fmt = meta["network_data_format"]
    for section in ("inputs", "outputs"):
        fmt[section] = _rename_io(fmt[section], spec.io_names.get(section, {}))
    return meta


def verify_bundle_metadata(
    meta_file: str | os.PathLike, schema: str | os.PathLike | None = None, official: bool = False
) -> None:
    """Validate ``meta_file`` with MONAI's ``verify_metadata``; raises ``ValueError`` naming the failed rule.

    Args:
        meta_file: the bundle's ``configs/metadata.json``.
        schema: schema file (default: the stored one; never downloaded).
        official: download the released ``meta_schema_20220324.json`` (MD5-checked) and validate against it.
    """
    from monai.bundle import verify_metadata

    if official:
        with tempfile.TemporaryDirectory() as tmp:
            verify_metadata(
                meta_file=str(meta_file),
                filepath=os.path.join(tmp, "meta_schema_20220324.json"),
                hash_val=OFFICIAL_SCHEMA_MD5,
                hash_type="md5",
            )
        return
    schema = Path(schema or STORED_SCHEMA)
    if not schema.is_file():
        raise FileNotFoundError(f"{schema}: schema file not found")
    # verify_metadata "downloads" the metadata's schema URL to `filepath`; an existing file is used as is
    verify_metadata(meta_file=str(meta_file), filepath=str(schema))
