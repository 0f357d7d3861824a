"""Decathlon-style datalists (``monai.data.load_decathlon_datalist`` reads them).

Sections: ``training``, ``validation``, ``test`` (and ``real_tumours`` for the lung-CT sanity set, which no
training code reads). Item keys are in :mod:`due_ext.data.schema`. Paths inside a datalist are relative to
the datalist's folder unless absolute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from due_ext.data.atomic import atomic_destination

SECTIONS = ("training", "validation", "test")


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON via a temporary file and rename (never half-written)."""
    with atomic_destination(path) as tmp, open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    return Path(path)


def write_datalist(path: str | os.PathLike, datalist: dict[str, Any]) -> Path:
    """Write a datalist JSON atomically. Every standard section is present (possibly empty)."""
    payload = dict(datalist)
    for section in SECTIONS:
        payload.setdefault(section, [])
    return write_json_atomic(path, payload)


def read_datalist(path: str | os.PathLike) -> dict[str, Any]:
    """Read a datalist JSON; raises ``ValueError`` naming the file if it is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist not found")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: a datalist must be a JSON object with sections {', '.join(SECTIONS)}")
    return payload
