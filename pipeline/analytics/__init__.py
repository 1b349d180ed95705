"""Reports over sweep results: accuracy tables with Wilson intervals."""

from pipeline.analytics.report import format_eps, render_table, summarize, to_markdown, wilson_interval

__all__ = ["format_eps", "render_table", "summarize", "to_markdown", "wilson_interval"]
