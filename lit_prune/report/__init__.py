"""Pruning reports: a Markdown page with PNG figures per run (``lit-prune report RUN_DIR``)."""

from lit_prune.report.collect import (
    MEASUREMENTS_FILE,
    BlockHistory,
    BlockScores,
    HeadScores,
    RunRecord,
    block_history,
    collect_run,
    summary_from_dict,
)
from lit_prune.report.markdown import REPORT_FILE, write_report

__all__ = [
    "MEASUREMENTS_FILE",
    "REPORT_FILE",
    "BlockHistory",
    "BlockScores",
    "HeadScores",
    "RunRecord",
    "block_history",
    "collect_run",
    "summary_from_dict",
    "write_report",
]
