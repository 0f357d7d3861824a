"""``configs/metadata.json`` of an exported bundle, and its check against the bundle metadata schema.

The model zoo validates metadata against ``meta_schema_20220324.json``, a release asset of
Project-MONAI/MONAI-extra-test-data (0.8.1) whose MD5 MONAI's own tests pin (:data:`OFFICIAL_SCHEMA_MD5`).
Release assets are in no git history we could read, and tests run offline, so ``schemas/`` holds instead
(details in ``schemas/README.md``):

- ``meta_schema_monai_9be9daa.json``: MONAI's own copy of that schema from the week it was written, verbatim
  (MONAI commit 9be9daa, ``tests/testing_data/schema.json``, Apache-2.0): a draft of the released file;
- ``meta_schema_20220324_reconstructed.json``: that draft with the changes MONAI's CI proves the released file
  made, written by :func:`reconstruct_release_schema` (a test keeps the file equal to its output). This is what
  :func:`verify_bundle_metadata` uses by default.

Where the network is reachable, ``verify_bundle_metadata(..., official=True)`` downloads the released file,
checks its MD5 and validates against it.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Iterable
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from due_ext.export.specs import ExportSpec
from due_ext.export.vendor import third_party_requirements
from due_ext.extras import require_extra

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
#: MONAI's draft of the released schema, verbatim (see the module docstring)
DRAFT_SCHEMA = SCHEMA_DIR / "meta_schema_monai_9be9daa.json"
#: the draft with the released file's known changes: the default schema of :func:`verify_bundle_metadata`
STORED_SCHEMA = SCHEMA_DIR / "meta_schema_20220324_reconstructed.json"
OFFICIAL_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
)
OFFICIAL_SCHEMA_MD5 = "662135097106b71067cd1fc657f8720f"

#: packages the exported configs use without the vendored code importing them
CONFIG_PACKAGES = {"interpolator": ("einops",)}

#: Draft fields the released schema does not require: MONAI's tests/testing_data/metadata.json has none of them
#: and MONAI's CI validates it against the released file (tests/bundle/test_bundle_verify_metadata.py)
NOT_REQUIRED_IN_RELEASE = ("authorship", "dataset_dir", "optional_packages_version")
#: Fields that metadata has, and the model zoo uses, in place of the draft's: ``authors`` replaced
#: ``authorship``; ``required_packages_version`` is what MONAI now reads (``optional_packages_version`` is a
#: deprecated alias of it, see :func:`export_metadata`)
RELEASE_PROPERTIES = {
    "authors": {"description": "state author(s) of the model package.", "type": "string"},
    "required_packages_version": {
        "description": "dictionary relating required package names to their versions.",
        "type": "object",
    },
}


def reconstruct_release_schema(draft: dict[str, Any]) -> dict[str, Any]:
    """The draft schema changed as far as the evidence goes (see :data:`NOT_REQUIRED_IN_RELEASE`,
    :data:`RELEASE_PROPERTIES`): the strictest schema that the metadata MONAI validates against the released
    file also passes. ``authors`` is required in place of ``authorship``."""
    schema = copy.deepcopy(draft)
    schema["description"] = (
        "Reconstruction of meta_schema_20220324.json (MONAI bundle metadata), not the released file: MONAI's "
        "draft (commit 9be9daa) with the released file's known changes. See due_ext/export/schemas/README.md."
    )
    schema["properties"].update(copy.deepcopy(RELEASE_PROPERTIES))
    required = [name for name in schema["required"] if name not in NOT_REQUIRED_IN_RELEASE]
    schema["required"] = [*required[: required.index("copyright")], "authors", *required[required.index("copyright") :]]
    return schema


def write_reconstructed_schema(path: str | os.PathLike = STORED_SCHEMA) -> Path:
    """Write :func:`reconstruct_release_schema` of the stored draft to ``path`` (how the stored file was made)."""
    schema = reconstruct_release_schema(json.loads(DRAFT_SCHEMA.read_text()))
    Path(path).write_text(json.dumps(schema, indent=4) + "\n")
    return Path(path)


def distribution_version(name: str) -> str:
    """Installed version of a distribution as published on PyPI (local build tags like ``+cpu`` dropped)."""
    return importlib_metadata.version(name).split("+")[0]


def export_metadata(source: dict[str, Any], spec: ExportSpec, vendored: Iterable[str]) -> dict[str, Any]:
    """The repository's ``metadata.json`` for the exported bundle: versions of this environment, the
    requirements of the vendored code instead of ``due-ext``, schema field names."""
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
    # MONAI (1.5) reads `optional_packages_version` as a deprecated name of `required_packages_version` and
    # replaces the latter with it when parsing metadata, so an exported bundle lists everything it uses in
    # `required_packages_version` (the train configs' TensorBoard handlers need tensorboard)
    for name in meta.pop("optional_packages_version", {}):
        required[name] = distribution_version(name)
    meta["required_packages_version"] = dict(sorted(required.items(), key=lambda item: item[0].lower()))
    return meta


def verify_bundle_metadata(
    meta_file: str | os.PathLike, schema: str | os.PathLike | None = None, official: bool = False
) -> None:
    """Validate ``meta_file`` with MONAI's ``verify_metadata``; raises ``ValueError`` naming the failed rule.

    Args:
        meta_file: the bundle's ``configs/metadata.json``.
        schema: schema file (default: the stored one; never downloaded).
        official: download the released ``meta_schema_20220324.json`` (MD5-checked) and validate against it.

    Raises :class:`~due_ext.extras.MissingExtraError` when ``jsonschema`` (the ``export`` extra) is missing.
    """
    require_extra("export", "validating bundle metadata (monai.bundle.verify_metadata)")
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
