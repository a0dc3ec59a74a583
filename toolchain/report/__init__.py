"""Run reports: Markdown/HTML with tables and PNG plots."""

from toolchain.report.render import write_report

__all__ = ["write_report"]
