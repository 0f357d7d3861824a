"""Experiments: grids of DUE-bundle runs (methods x seeds x training-set sizes x lambda), their table and figures.

``python -m due_ext experiment run --config experiments/table1.yaml --out DIR`` runs a grid (resumable),
``python -m due_ext experiment table DIR`` prints the Table-1-style markdown table and
``python -m due_ext experiment figures DIR`` writes the paper-style figures.
"""

from due_ext.experiments.config import Cell, Experiment, ExperimentConfigError, load_experiment
from due_ext.experiments.runner import read_rows, run_experiment
from due_ext.experiments.table import experiment_table, markdown_table, summarize

__all__ = ["Cell", "Experiment", "ExperimentConfigError", "experiment_table", "load_experiment", "markdown_table",
           "read_rows", "run_experiment", "summarize"]
