"""The download cache (never inside the repository) and the fetch of the pyradiomics data files.

Cache folder: ``$DUE_EXT_CACHE`` if set, else ``~/.cache/due_ext``.

The ``lung-ct`` builder needs the two chest CTs (``lung1``, ``lung2``; NRRD image + real tumour label) that
ship in the ``data/`` folder of the ``pyradiomics==3.0.1`` *source* distribution on PyPI. We fetch it with
pip (``pip download --no-deps --no-binary :all:``), check its SHA-256, extract only the lung files of
``data/`` (no other member, no path outside the target) and rename the finished folder into place, so the
cache is either complete or absent. Offline: put ``pyradiomics-3.0.1.tar.gz`` into the cache folder
yourself; it is used instead of downloading. The provenance of these images is undocumented upstream:
use them as demo backgrounds, never commit them. :func:`fetch_pyradiomics_labels` takes the five tumour labels
of the same folder (brain, breast, lung) into their own cache folder, and :func:`fetch_icbm152_tissue_maps` the
MNI ICBM 2009a symmetric T1 template and its grey/white-matter probability maps from the ``nilearn==0.14.1``
wheel (``nilearn/datasets/data/``; the template's licence is in its README upstream, free for research use),
both for :mod:`due_ext.interp.real_masks`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

PYRADIOMICS_VERSION = "3.0.1"
PYRADIOMICS_SDIST = f"pyradiomics-{PYRADIOMICS_VERSION}.tar.gz"
#: SHA-256 of the sdist on PyPI.
PYRADIOMICS_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
#: Files taken from the sdist's ``data/`` folder.
LUNG_FILES = ("lung1_image.nrrd", "lung1_label.nrrd", "lung2_image.nrrd", "lung2_label.nrrd", "README.md")
#: The tumour labels of the sdist's ``data/`` folder (real drawings on clinical MR, mammography MR and CT).
LABEL_FILES = ("brain1_label.nrrd", "brain2_label.nrrd", "breast1_label.nrrd", "lung1_label.nrrd",
               "lung2_label.nrrd", "README.md")
_DONE_MARKER = ".complete"


NILEARN_VERSION = "0.14.1"
NILEARN_WHEEL = f"nilearn-{NILEARN_VERSION}-py3-none-any.whl"
#: SHA-256 of the wheel on PyPI.
NILEARN_SHA256 = "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"
#: Files taken from the wheel's ``nilearn/datasets/data/`` folder.
ICBM152_FILES = tuple(f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm"))


class FetchError(RuntimeError):
    """The pyradiomics data could not be downloaded or extracted; the message says what to do."""


def cache_dir() -> Path:
    """The cache folder (created if missing): ``$DUE_EXT_CACHE`` or ``~/.cache/due_ext``."""
    root = Path(os.environ.get("DUE_EXT_CACHE") or Path.home() / ".cache" / "due_ext").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(requirement: str, filename: str, dest: Path, binary: bool) -> Path:
    """``pip download --no-deps`` of ``requirement`` (an sdist, or a wheel with ``binary``) into ``dest`` (a
    temporary folder); returns the path of ``filename`` there."""
    # pip prepares metadata of an sdist even for `download`; pyradiomics' setup.py bundles its own versioneer
    # and needs numpy (a dependency of ours), so --no-build-isolation works without installing anything.
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:", "--no-build-isolation"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, requirement, "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    path = dest / filename
    if result.returncode != 0 or not path.is_file():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        name, version = requirement.split("==")
        raise FetchError(
            f"could not download {filename} from PyPI (pip exit status {result.returncode}):\n{tail}\n"
            f"Offline? Copy {filename} (from https://pypi.org/project/{name}/{version}/#files) into {cache_dir()} "
            "and run again.")
    return path


def _verified(path: Path, sha256: str) -> str:
    """``path``'s SHA-256, which must be ``sha256`` (raises :class:`FetchError` naming the file otherwise)."""
    checksum = _sha256(path)
    if checksum != sha256:
        raise FetchError(f"{path}: SHA-256 {checksum} differs from PyPI's {sha256}; delete it and run again")
    return checksum


def _publish(staged: Path, target: Path, provenance: str) -> None:
    """Mark ``staged`` complete and rename it to ``target``, so a cache folder is either complete or absent."""
    (staged / _DONE_MARKER).write_text(provenance + "\n")
    if target.exists():  # a half-finished earlier attempt (no marker): replace it
        shutil.rmtree(target)
    try:
        os.replace(staged, target)
    except OSError:
        if not (target / _DONE_MARKER).is_file():  # lost a race only if the winner finished
            raise


def _extract_data_files(tarball: Path, target: Path, names: tuple[str, ...] = LUNG_FILES) -> None:
    """Extract ``names`` (default: the lung files) of ``data/`` into ``target``, reading only regular-file members
    by name."""
    wanted = {f"pyradiomics-{PYRADIOMICS_VERSION}/data/{name}": name for name in names}
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            found = set()
            for member in archive:
                name = wanted.get(member.name)
                if name is None or not member.isfile():
                    continue  # skip everything else, links included: no path traversal is possible
                source = archive.extractfile(member)
                with source, open(target / name, "wb") as out:
                    shutil.copyfileobj(source, out)
                found.add(name)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise FetchError(f"{tarball}: not a readable tar.gz archive ({err}); delete it and run again") from err
    missing = sorted(set(names) - found)
    if missing:
        raise FetchError(f"{tarball}: data/ lacks {', '.join(missing)}; is it really {PYRADIOMICS_SDIST}?")


def fetch_pyradiomics_data() -> Path:
    """Folder holding ``lung{1,2}_{image,label}.nrrd``; downloads and extracts them on first use.

    Raises :class:`FetchError` with instructions when the download fails or the archive is wrong.
    """
    return _fetch_pyradiomics_files(LUNG_FILES, f"pyradiomics-{PYRADIOMICS_VERSION}-data")


def fetch_pyradiomics_labels() -> Path:
    """Folder holding the five tumour labels ``{brain1,brain2,breast1,lung1,lung2}_label.nrrd``; downloads and
    extracts them on first use (same sdist, same checks as :func:`fetch_pyradiomics_data`)."""
    return _fetch_pyradiomics_files(LABEL_FILES, f"pyradiomics-{PYRADIOMICS_VERSION}-labels")


def fetch_icbm152_tissue_maps() -> Path:
    """Folder holding :data:`ICBM152_FILES` (1 mm MNI ICBM 2009a symmetric T1 and grey/white-matter probability
    maps, 0-255), taken from the nilearn wheel on PyPI (``pip download``, SHA-256 checked) on first use.
    Offline: put ``nilearn-0.14.1-py3-none-any.whl`` into the cache folder."""
    return _fetch_into_cache(f"nilearn-{NILEARN_VERSION}-icbm152", NILEARN_WHEEL, f"nilearn=={NILEARN_VERSION}",
                             NILEARN_SHA256, binary=True, extract=_extract_icbm152_maps)


def _extract_icbm152_maps(wheel: Path, target: Path) -> None:
    """Copy :data:`ICBM152_FILES` out of the nilearn wheel into ``target``, reading members by exact name."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in ICBM152_FILES:  # nothing else leaves the archive
                with archive.open(f"nilearn/datasets/data/{name}") as source, open(target / name, "wb") as out:
                    shutil.copyfileobj(source, out)
    except (zipfile.BadZipFile, KeyError, OSError) as err:
        raise FetchError(f"{wheel}: cannot read the ICBM152 maps ({err}); delete it and run again") from err


def _fetch_pyradiomics_files(names: tuple[str, ...], folder: str) -> Path:
    return _fetch_into_cache(folder, PYRADIOMICS_SDIST, f"pyradiomics=={PYRADIOMICS_VERSION}", PYRADIOMICS_SHA256,
                             binary=False, extract=lambda tarball, staged: _extract_data_files(tarball, staged, names))


def _fetch_into_cache(folder: str, filename: str, requirement: str, sha256: str, binary: bool,
                      extract: Callable[[Path, Path], None]) -> Path:
    """``<cache>/folder``, filled on first use: the archive ``filename`` (one the user put into the cache folder
    for offline use, else ``pip download`` of ``requirement``) is checked against ``sha256``, ``extract(archive,
    staged)`` fills a temporary folder, and that folder is renamed into place complete (:func:`_publish`)."""
    root = cache_dir()
    target = root / folder
    if (target / _DONE_MARKER).is_file():
        return target
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        tmp = Path(tmp)
        archive = root / filename
        if not archive.is_file():
            archive = _pip_download(requirement, filename, tmp, binary=binary)
        checksum = _verified(archive, sha256)
        staged = tmp / "data"
        staged.mkdir()
        extract(archive, staged)
        _publish(staged, target, f"{filename} sha256={checksum}")
    return target
