"""`charlstm compare-variants`: several cells under one budget, side by side (docs/compare.md).

settings.py turns options into a ``config.CompareConfig`` and sizes the models;
runner.py plans, trains (or reads back) and summarises the runs; report.py
writes the files and builds the tables that the command line prints.
"""

from .report import LN2, finite_json, format_pm, make_table, mean_curve, mean_std
from .runner import plan_runs, run_comparison
from .settings import match_parameters, reference_parameters, settings_from_options, threads_per_job

__all__ = [
    "LN2", "finite_json", "format_pm", "make_table", "match_parameters", "mean_curve", "mean_std", "plan_runs",
    "reference_parameters", "run_comparison", "settings_from_options", "threads_per_job",
]
