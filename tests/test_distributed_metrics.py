"""Validation metrics under torch.distributed: each process evaluates its shard of the validation set, the metrics
gather every shard, and the result is what one process computes on the whole set.

- unit: :class:`~due_ext.engines.ClassificationMetric` and :class:`~due_ext.engines.ExplanationMetric` in a
  two-process gloo group (``torch.multiprocessing`` spawn), shards of unequal size, one without any positive;
- bundle: ``train.json`` + ``multi_gpu_train.json`` under torchrun (two gloo processes, phantom,
  ``baseline_plus``, 2 epochs); :class:`ValidationRecorder` (added through one more config file) records every
  rank's validation; one process then evaluates the same weights with ``train.json``'s own evaluator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine, Events

from due_ext.engines import ClassificationMetric, ExplanationEvaluator, ExplanationMetric

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "due"
CLASSIFICATION = ("pr_auc", "roc_auc", "accuracy")
EXPLANATION = ("iou", "f1")
SIZE = (6, 6, 4)


def _outputs(seed: int, labels: list[int], with_mask: bool = True) -> dict[str, torch.Tensor]:
    """One batch of the evaluator's output: class probabilities, label, CAM in [0, 1], reference mask."""
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    p1 = torch.rand(n, generator=generator)
    mask = (torch.rand(n, *SIZE, generator=generator) > 0.6).float()
    return {"pred": torch.stack([1 - p1, p1], 1), "label": torch.tensor(labels),
            "cam": torch.rand(n, *SIZE, generator=generator), "mask": mask if with_mask else None,
            "has_mask": torch.full((n,), with_mask)}


# rank 0: 3 items in two batches; rank 1: 2 negatives, hence no explanation score at all on that process
SHARDS = [[_outputs(0, [1, 0]), _outputs(1, [1])], [_outputs(2, [0, 0], with_mask=False)]]


def _metrics() -> dict[str, ClassificationMetric | ExplanationMetric]:
    return {**{name: ClassificationMetric(name) for name in CLASSIFICATION},
            **{f"explanation_{name}": ExplanationMetric(name) for name in EXPLANATION}}


def _compute(batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    results = {}
    for key, metric in _metrics().items():
        metric.reset()
        for batch in batches:
            metric.update(batch)
        results[key] = metric.compute()
    return results


def _gather_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(_compute(SHARDS[rank]), Path(out_dir) / f"rank{rank}.pt")
        evaluator = ExplanationEvaluator(device=torch.device("cpu"), val_data_loader=[], network=torch.nn.Identity())
        try:
            evaluator.run()
            empty_shard = "no error"
        except ValueError as error:
            empty_shard = str(error)
        (Path(out_dir) / f"empty{rank}.txt").write_text(empty_shard)
    finally:
        dist.destroy_process_group()


def test_metrics_gather_every_process_shard(tmp_path):
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    whole = _compute(SHARDS[0] + SHARDS[1])  # one process, every item
    assert whole["explanation_iou"] == whole["explanation_iou"]  # two positives with a mask: not nan
    for rank in (0, 1):
        gathered = torch.load(tmp_path / f"rank{rank}.pt")
        for name in CLASSIFICATION:
            # the same float32 scores, only in another order; the areas depend on the scores' ranks alone
            assert gathered[name] == whole[name], (rank, name)
        for name in EXPLANATION:
            # the same float32 per-positive values averaged in float64 in another order: 2 values in [0, 1],
            # one rounding of the sum of at most 2^-53 * 2 apart, halved
            assert gathered[f"explanation_{name}"] == pytest.approx(whole[f"explanation_{name}"], rel=0, abs=2**-53)
        # an empty shard stops its process with an error instead of leaving the others waiting in the gather
        assert f"process {rank} of 2 has no item to evaluate" in (tmp_path / f"empty{rank}.txt").read_text()
    # without gathering, rank 0 would score its own 3 items: a different PR-AUC on this data
    assert _compute(SHARDS[0])["pr_auc"] != whole["pr_auc"]


def test_metrics_without_process_group_use_local_items():
    assert not dist.is_initialized()
    results = _compute(SHARDS[1])
    assert results["accuracy"] == pytest.approx(sum(SHARDS[1][0]["pred"][:, 1] < 0.5).item() / 2)
    assert results["explanation_iou"] != results["explanation_iou"]  # nan: no positive
    with pytest.raises(RuntimeError, match="before any update"):
        ClassificationMetric("roc_auc").compute()


class ValidationRecorder:
    """Test handler on the validation evaluator (attached by the extra config of the bundle test): per epoch,
    this rank's number of items, its metrics and model selection, as JSON lines in ``directory/rank<r>.jsonl``;
    rank 0 also saves the weights it validated (``weights_epoch=<e>.pt``)."""

    def __init__(self, directory: str, network: torch.nn.Module) -> None:
        self.directory = Path(directory)
        self.network = network
        self.items = 0
        self.directory.mkdir(parents=True, exist_ok=True)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._record)

    def _reset(self, _engine: Engine) -> None:
        self.items = 0

    def _count(self, engine: Engine) -> None:
        self.items += len(engine.state.output["label"])

    def _record(self, engine: Engine) -> None:
        rank = dist.get_rank()
        record = {"epoch": engine.state.epoch, "items": self.items, "metrics": dict(engine.state.metrics),
                  "best": [engine.state.best_metric, engine.state.best_metric_epoch]}
        with open(self.directory / f"rank{rank}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if rank == 0:
            torch.save(self.network.state_dict(), self.directory / f"weights_epoch={engine.state.epoch}.pt")


# batch 1 for validation in both runs: every item's forward pass is then the same computation whichever
# process or batch it falls in (oneDNN picks convolution kernels by batch size), so the per-item values agree
# bit for bit and only the order of the gathered items differs
OVERRIDES = {"demo_dataset": "phantom", "method": "baseline_plus", "max_epochs": 2, "block_inplanes": [4, 8, 8, 8],
             "validate#dataloader#batch_size": 1}


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # the torchrun processes use one thread too: same kernels, same bits
def test_two_process_validation_equals_one_process_on_the_same_weights(tmp_path, monkeypatch):
    from monai.bundle import ConfigParser

    from due_ext.engines import load_network_weights

    records = tmp_path / "records"
    extra = tmp_path / "record_validation.json"
    extra.write_text(json.dumps({
        "+imports": ["$import test_distributed_metrics"],
        "+initialize": [f"$test_distributed_metrics.ValidationRecorder({str(records)!r}, @network.module)"
                        ".attach(@validate#evaluator)"]}))
    configs = json.dumps([str(BUNDLE / "train.json"), str(BUNDLE / "multi_gpu_train.json"), str(extra)])
    root = tmp_path / "bundle"
    cli = [item for key, value in OVERRIDES.items()
           for item in (f"--{key}", value if isinstance(value, str) else json.dumps(value))]
    env = dict(os.environ, DUE_EXT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle",
                          "run", "--config_file", configs, "--bundle_root", str(root), *cli],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    ranks = [[json.loads(line) for line in (records / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [r["epoch"] for r in ranks[0]] == [r["epoch"] for r in ranks[1]] == [1, 2]

    # one process, train.json's own validation (no handlers: it must not overwrite anything), the same weights
    monkeypatch.setenv("DUE_EXT_CACHE", str(tmp_path / "cache"))
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "train.json"))
    parser.update({**OVERRIDES, "bundle_root": str(tmp_path / "one"), "validate#handlers": []})
    evaluator, network = parser.get_parsed_content("validate#evaluator"), parser.get_parsed_content("network")
    n_validation = len(parser.get_parsed_content("validate#dataset"))
    for first, second in zip(*ranks, strict=True):
        # sharded: each process validated part of the set, together all of it
        assert 0 < first["items"] < n_validation and first["items"] + second["items"] == n_validation
        # gathered: every process computed the same metrics and keeps the same best epoch
        assert first["metrics"] == second["metrics"] and first["best"] == second["best"]
        load_network_weights(network, records / f"weights_epoch={first['epoch']}.pt")
        evaluator.run()
        single = evaluator.state.metrics
        assert first["metrics"].keys() == single.keys() == {"val_pr_auc", "val_roc_auc", "val_iou"}
        # areas: the same scores, gathered in another order, rank-based -> equal; IoU: the same float32 values per
        # positive averaged in float64 in another order -> apart by at most n_validation * 2^-53 (values <= 1)
        assert first["metrics"]["val_pr_auc"] == single["val_pr_auc"]
        assert first["metrics"]["val_roc_auc"] == single["val_roc_auc"]
        assert first["metrics"]["val_iou"] == pytest.approx(single["val_iou"], rel=0, abs=n_validation * 2**-53)

    # model selection stays on rank 0's files: the best model is the weights validated at the best epoch
    best_epoch = ranks[0][-1]["best"][1]
    assert best_epoch in (1, 2)
    best = torch.load(root / "models" / "baseline_plus" / "model.pt", weights_only=True)
    validated = torch.load(records / f"weights_epoch={best_epoch}.pt", weights_only=True)
    assert best.keys() == validated.keys() and all(torch.equal(best[k], validated[k]) for k in best)
