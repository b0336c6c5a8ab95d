"""The report stage: a static, self-contained HTML review of a run (see ``build_report``)."""

from semclust.report.build import build_report
from semclust.report.cli import add_report_arguments, run_report_command
from semclust.report.options import ReportOptions

__all__ = ["ReportOptions", "add_report_arguments", "build_report", "run_report_command"]
