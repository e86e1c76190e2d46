"""Benchmark runner: methods x categories -> results.csv, summary.md, report.html."""

from .methods import DEFAULT_METHODS, MethodSpec, builtin_methods, parse_methods
from .runner import COLUMNS, find_categories, run_benchmark, summary_markdown

__all__ = ["COLUMNS", "DEFAULT_METHODS", "MethodSpec", "builtin_methods", "find_categories", "parse_methods",
           "run_benchmark", "summary_markdown"]
