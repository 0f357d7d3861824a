"""Wall time of DUE's derivation (interpolation + uncertainty weights of the training and validation sections,
shipped models) on the demo set, with one process and with several sharing it under ``torch.distributed.run``.

Each configuration derives into a fresh copy of the dataset folder (derived files go beside the datalist), so
nothing is reused between them; the derived volumes of every configuration are compared with the first one's.

    python benchmarks/bench_derivation.py --dataset lung-ct --configs 1x1,2x1,1x2
    (PROCESSESxTHREADS each; the demo set is built first if needed)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORKER = """
import sys, torch.distributed as dist
from due_ext import bundles
dist.init_process_group("gloo")
print(bundles.derive_uncertainty_keys(sys.argv[1]))
dist.destroy_process_group()
"""


def _derive(datalist: Path, processes: int, threads: int) -> tuple[float, Path]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if processes == 1:
        command = [sys.executable, "-c", "import sys; from due_ext import bundles; "
                   "print(bundles.derive_uncertainty_keys(sys.argv[1]))", str(datalist)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--no-python", sys.executable, "-c", WORKER, str(datalist)]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(run.stdout[-2000:] + run.stderr[-2000:])
    return elapsed, Path(run.stdout.strip().splitlines()[-1])


def _volumes(datalist: Path) -> dict[str, np.ndarray]:
    from due_ext.data.nifti import read_nifti

    payload = json.loads(datalist.read_text())
    return {f"{Path(item['annotation']).name}:{key}": read_nifti(item[key])[0]
            for section in ("training", "validation") for item in payload[section] if "weights" in item
            for key in ("interpolation", "variance", "weights")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="lung-ct")
    parser.add_argument("--configs", default="1x1,2x1,1x2", help="PROCESSESxTHREADS, comma-separated")
    options = parser.parse_args()

    from due_ext.bundles import demo_datalist
    from due_ext.data.datalist import read_datalist

    source = Path(demo_datalist(options.dataset)).parent
    payload = read_datalist(source / "datalist.json")
    n_items = sum("annotation" in i for s in ("training", "validation") for i in payload[s])
    # Files are compared with the first run that used as many threads per process: the thread count changes
    # the order of float32 sums inside the networks, the number of processes must not change anything.
    rows, first = [], {}
    with tempfile.TemporaryDirectory(prefix="due-derive-") as tmp:
        for config in options.configs.split(","):
            processes, threads = (int(v) for v in config.split("x"))
            folder = Path(tmp) / config
            shutil.copytree(source, folder, ignore=shutil.ignore_patterns("derived-*"))
            seconds, derived = _derive(folder / "datalist.json", processes, threads)
            volumes = _volumes(derived)
            reference = first.setdefault(threads, volumes)
            same = "reference" if reference is volumes else ("bit-identical" if volumes.keys() == reference.keys()
                                                              and all(np.array_equal(v, reference[k])
                                                                      for k, v in volumes.items()) else "DIFFERENT")
            rows.append((processes, threads, seconds, same))
    print(f"{options.dataset}: {n_items} annotated items (training + validation)")
    print("| processes | threads each | seconds | derived files vs the first run with as many threads each |")
    print("|---|---|---|---|")
    for processes, threads, seconds, same in rows:
        print(f"| {processes} | {threads} | {seconds:.1f} | {same} |")


if __name__ == "__main__":
    main()
