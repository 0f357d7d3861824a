"""The run report: what an evaluation leaves behind (``metrics.json``, ``metrics.csv``, figures) and how it is
regenerated (``python -m due_ext report RUN_DIR``)."""

from due_ext.report.recorder import EvaluationRecorder
from due_ext.report.summary import load_evaluation, summarize_evaluation, write_report

__all__ = ["EvaluationRecorder", "load_evaluation", "summarize_evaluation", "write_report"]
