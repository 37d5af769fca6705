"""Benchmarks of the engine: scenarios (load, single stream, offline), reports, plots, roofline.

``run_bench(BenchConfig(model=...))`` returns a :class:`Report`;
``write_report(report, out_dir)`` writes ``report.json``, ``report.md`` and PNG plots.
"""

from engine.bench.report import (
    SCHEMA_VERSION,
    BenchConfig,
    Report,
    ReportError,
    read_report,
    write_report,
)
from engine.bench.roofline import Roofline, bound_tokens_per_second, decode_bytes_per_step
from engine.bench.stats import Summary, percentile, summarize

__all__ = [
    "SCHEMA_VERSION",
    "BenchConfig",
    "Report",
    "ReportError",
    "Roofline",
    "Summary",
    "bound_tokens_per_second",
    "decode_bytes_per_step",
    "percentile",
    "read_report",
    "summarize",
    "write_report",
]
