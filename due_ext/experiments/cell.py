"""One grid cell in its own process: ``python -m due_ext.experiments.cell SPEC.json``.

Trains with the DUE bundle's ``train.json`` (which ends by evaluating the best model on the test split),
evaluates each extra section with ``train.json + evaluate.json``, then writes ``result.json`` (the results row)
atomically. A cell runs in a subprocess so that a crash loses that cell only and its memory goes back to the
system; the row is written last, so a cell without ``result.json`` is unfinished and the runner runs it again.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

#: Resolved bundle values recorded in every row (what the cell actually trained with).
RECORDED_KEYS = ("method", "lam", "seed", "max_epochs", "batch_size", "learning_rate", "target_layer",
                 "block_inplanes", "spatial_size", "val_interval")
RESULT_FILE = "result.json"


def _workflow(configs: list[str], overrides: dict[str, Any]):
    from monai.bundle import ConfigWorkflow

    # workflow_type=None: the DUE configs are checked by their own tests; here we only run them
    return ConfigWorkflow(config_file=configs, workflow_type=None, **overrides)


def _run(configs: list[str], overrides: dict[str, Any]) -> dict[str, Any]:
    workflow = _workflow(configs, overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    parser = workflow.parser
    return {key: parser.get_parsed_content(key) for key in RECORDED_KEYS if key in parser}


def run_cell(spec: dict[str, Any], cell_dir: str | Path) -> dict[str, Any]:
    """Train and evaluate one cell described by ``spec`` (written by the runner into ``cell_dir`` =
    ``OUT/cells/<cell>``); returns the results row. Paths in ``spec`` are relative to ``OUT`` or portable
    (:mod:`due_ext.experiments.paths`) and are resolved here only, for the bundle."""
    from due_ext.experiments.datalists import resolved_datalist
    from due_ext.experiments.paths import resolve_portable

    cell_dir = Path(cell_dir).resolve()
    out = cell_dir.parent.parent
    bundle = resolve_portable(spec["bundle_dir"])
    run_dir = cell_dir / "run"
    # a crashed attempt left a partial run: start clean so every row comes from one uninterrupted training
    shutil.rmtree(run_dir, ignore_errors=True)
    # the committed subset names volumes relative to its data root; the bundle gets a local absolute copy
    datalist = resolved_datalist(out / spec["datalist"], run_dir / "datalist.json")
    overrides = {"method": spec["method"], "seed": spec["seed"], "datalist": datalist, "output_dir": str(run_dir),
                 "ckpt_dir": str(run_dir / "models"), **spec.get("overrides", {})}
    if spec.get("lam") is not None:
        overrides["lam"] = spec["lam"]
    train, evaluate = str(bundle / "train.json"), str(bundle / "evaluate.json")
    start = time.perf_counter()
    resolved = _run([train], overrides)  # ends with the test-split evaluation
    trained = time.perf_counter()
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    extra: dict[str, Any] = {}
    for section in spec.get("extra_sections", []):
        # the same evaluation on another section of the datalist (e.g. the two real tumours); a failure here is
        # recorded, not fatal: the test metrics are the cell's result
        section_overrides = {**overrides, "evaluation_dir": str(run_dir / section),
                             "test#datalist": "$monai.data.load_decathlon_datalist(@datalist, True, "
                                                      f"'{section}')"}
        try:
            _run([train, evaluate], section_overrides)
            extra[section] = json.loads((run_dir / section / "metrics.json").read_text())
        except Exception as err:  # noqa: BLE001 - any failure of the optional section is reported in the row
            extra[section] = {"error": f"{type(err).__name__}: {err}"}
    row = {"experiment": spec["experiment"], "cell": spec["cell"], **{k: spec[k] for k in
                                                                          ("method", "seed", "train_size", "lam")},
           "config": resolved, "overrides": spec.get("overrides", {}), "datalist": spec["datalist"],
           "data_root": spec["data_root"],
           "revision": spec.get("revision"), "threads": _threads(),
           "wall_time_s": {"train": round(trained - start, 2), "total": round(time.perf_counter() - start, 2)},
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "metrics": metrics, "extra_sections": extra}
    if row["lam"] is None:
        row["lam"] = resolved.get("lam")
    from due_ext.data.datalist import write_json_atomic

    write_json_atomic(cell_dir / RESULT_FILE, row)
    return row


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m due_ext.experiments.cell SPEC.json")
    run_cell(json.loads(Path(args[0]).read_text()), Path(args[0]).parent)


if __name__ == "__main__":
    main()
