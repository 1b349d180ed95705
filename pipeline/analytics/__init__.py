"""Analytics over sweep results: report sections with Wilson intervals, paired comparisons,
plots, RobustBench-style exports, a self-contained HTML page, and SQL over the records."""

from pipeline.analytics.render import (format_eps, render_section, render_table, render_tables, report_markdown,
                                       section_markdown, to_csv, to_json, to_markdown)
from pipeline.analytics.report import (SECTIONS, build_report, cost, flags, load_records, per_class, prediction,
                                       stages, summarize, wilson_interval)
from pipeline.analytics.source import connect, connect_table

__all__ = ["SECTIONS", "build_report", "connect", "connect_table", "cost", "flags", "format_eps", "load_records",
           "per_class", "prediction", "render_section", "render_table", "render_tables", "report_markdown", "section_markdown",
           "stages", "summarize", "to_csv", "to_json", "to_markdown", "wilson_interval"]
