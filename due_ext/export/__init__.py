"""Sharing the bundles: export in the MONAI model-zoo layout (``python -m due_ext bundle export``)."""

from due_ext.export.bundle import export_bundle
from due_ext.export.metadata import verify_bundle_metadata

__all__ = ["export_bundle", "verify_bundle_metadata"]
