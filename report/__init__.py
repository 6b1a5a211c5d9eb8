"""Accuracy-versus-latency report: what each precision and step budget costs and loses, measured where it runs."""

from trm_export.report.measure import ReportOptions, measure_bundle
from trm_export.report.render import write_report

__all__ = ["ReportOptions", "measure_bundle", "write_report"]
