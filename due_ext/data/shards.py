"""Derivation in fixed work units, shared between processes and resumable after a kill.

The upstream bundles derive per-item volumes (interpolation, variance, weights) for a whole datalist. Under
``torchrun`` every rank runs the same config, so without care every rank derives every item into the same
folder at the same time. Here the items are cut into fixed *units* of consecutive items; rank ``r`` of ``W``
derives units ``r, r + W, ...``; each unit's result is recorded in a small JSON *receipt*, written atomically
after the unit's files, with a checksum of every file; rank 0 assembles the receipts once all ranks are done.

Why units of a fixed size rather than ``items[rank::world]``: a unit's items are sampled as one batch, and a
network's float32 results can depend on the batch it ran in (another kernel, another summation order). Fixed
units make each item's batch, hence its bits, independent of how many processes share the work.

Crash safety: a unit without a receipt is derived again; a receipt whose files are missing or whose checksums do
not match (a corrupted cache) is discarded and the unit derived again. A file lock per unit keeps two
independent runs on one folder (two experiment cells, say) from deriving the same unit twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from due_ext.data.datalist import write_json_atomic

logger = logging.getLogger("due_ext.data")

#: Items per work unit: large enough to fill a sampling batch (4 volumes x their blocks x 8 repeats = 32 chains or
#: more per denoising step), small enough that processes share even a small datalist.
DEFAULT_UNIT_SIZE = 4


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes sharing a derivation."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world) with world >= 1, got rank {self.rank}, world {self.world}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_shard() -> Shard:
    """The torch.distributed rank and world size when a process group is initialised, else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def barrier(shard: Shard) -> None:
    """Wait for every process of the group (nothing to wait for alone)."""
    if shard.world > 1:
        import torch.distributed as dist

        dist.barrier()


def unit_ranges(n_items: int, unit_size: int = DEFAULT_UNIT_SIZE) -> list[range]:
    """Consecutive item index ranges of at most ``unit_size``: ``[0, s), [s, 2s), ...``."""
    if unit_size < 1:
        raise ValueError(f"unit_size must be >= 1, got {unit_size}")
    return [range(start, min(start + unit_size, n_items)) for start in range(0, n_items, unit_size)]


def file_checksum(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _receipt_path(folder: Path, unit: range) -> Path:
    return folder / f"unit-{unit.start:06d}-{unit.stop:06d}.json"


def read_receipt(folder: Path, unit: range, names: Sequence[str]) -> list[dict[str, str]] | None:
    """The unit's recorded entries if its receipt and every file it names are intact, else ``None``."""
    path = _receipt_path(folder, unit)
    if not path.is_file():
        return None
    try:
        receipt = json.loads(path.read_text())
        entries, checksums = receipt["entries"], receipt["checksums"]
        intact = (receipt["names"] == list(names) and len(entries) == len(unit)
                  and all(Path(f).is_file() and file_checksum(f) == digest for f, digest in checksums.items()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("%s: unreadable receipt (%s); deriving the unit again", path, err)
        return None
    if not intact:
        logger.warning("%s: its files are missing, changed or belong to other items; deriving the unit again", path)
        return None
    return entries


def broken_receipts(folder: str | os.PathLike) -> list[Path]:
    """The receipts in ``folder`` whose files are missing or changed (a finished derivation, checked before reuse)."""
    broken = []
    for path in sorted(Path(folder).glob("unit-*.json")):
        try:
            receipt = json.loads(path.read_text())
            intact = all(Path(f).is_file() and file_checksum(f) == digest for f, digest in receipt["checksums"].items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            intact = False
        if not intact:
            broken.append(path)
    return broken


def derive_in_units(names: Sequence[str], derive_unit: Callable[[range], list[dict[str, str]]],
                    folder: str | os.PathLike, shard: Shard | None = None, unit_size: int = DEFAULT_UNIT_SIZE,
                    progress: bool = False) -> list[dict[str, str]] | None:
    """Derive ``len(names)`` items in units; returns, on the main process, one entry per item.

    Args:
        names: one unique name per item (recorded, so a receipt of another item list is never reused).
        derive_unit: computes the items of a unit (a ``range`` of item indices) and writes their files;
            returns per item a dict ``key -> path of the file written`` (every path is checksummed).
        folder: where the receipts and their locks live.
        shard: this process's share (default :func:`current_shard`).
        unit_size: items per unit; results do not depend on ``shard``, only on this.
        progress: show a progress bar of this process's units.

    Returns:
        The entries of all items, in order, on the main process (after every process has finished); ``None`` on
        the others. Every process must call this (it waits for all of them).
    """
    shard = shard or current_shard()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    units = unit_ranges(len(names), unit_size)
    mine = units[shard.rank::shard.world]
    if progress:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc=f"deriving (process {shard.rank + 1}/{shard.world})", unit="unit")
    for unit in mine:
        unit_names = [names[i] for i in unit]
        with FileLock(str(_receipt_path(folder, unit)) + ".lock"):
            if read_receipt(folder, unit, unit_names) is not None:
                continue
            entries = derive_unit(unit)
            if len(entries) != len(unit):
                raise RuntimeError(f"derive_unit returned {len(entries)} entries for the {len(unit)} items {unit}")
            checksums = {path: file_checksum(path) for entry in entries for path in entry.values()}
            write_json_atomic(_receipt_path(folder, unit),
                              {"names": unit_names, "entries": entries, "checksums": checksums,
                               "derived_by": {"rank": shard.rank, "world": shard.world}})
    barrier(shard)
    if not shard.is_main:
        return None
    collected: list[dict[str, Any]] = []
    for unit in units:
        entries = read_receipt(folder, unit, [names[i] for i in unit])
        if entries is None:
            raise RuntimeError(f"{_receipt_path(folder, unit)}: a process finished without a valid receipt for "
                               f"items {unit.start}-{unit.stop - 1}")
        collected.extend(entries)
    return collected
