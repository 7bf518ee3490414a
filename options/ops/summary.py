"""What a finished run reports: one summary line in the log, and a metrics file for Prometheus.

The metrics file is in the Prometheus text format, for node_exporter's textfile collector
(``--collector.textfile.directory``): written whole to a temporary file and renamed over the
old one, so the collector never reads half a file. Each job writes its own file; the figures
are those of the job's last run, plus the time of its last successful run.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from options.store.runs import STATUS_EXIT_CODES, RunSummary

logger = logging.getLogger(__name__)

METRIC_PREFIX = "options_history"
_COUNTS = (
    ("underlyings_requested", "Underlyings the last run was asked to do"),
    ("underlyings_succeeded", "Underlyings the last run completed"),
    ("underlyings_failed", "Underlyings the last run failed, or stored incompletely"),
    ("rows_fetched", "Rows the last run read from the API"),
    ("rows_written", "Rows the last run stored"),
    ("rows_rejected", "Rows the last run refused"),
    ("contracts_deactivated", "Contracts the last run marked inactive"),
    ("api_requests", "API requests the last run sent, retries included"),
)


def log_summary(summary: RunSummary) -> None:
    """One line per run: its status, duration and counts (with ``--log-format json`` one JSON
    object whose fields are the summary's)."""
    seconds = f"{summary.seconds:.1f} s" if summary.seconds is not None else "duration unknown"
    logger.info(
        "Run summary: ingest_%s run %d %s in %s: %d/%d underlyings, %d rows written, "
        "%d rejected, %d contracts deactivated, %d API requests%s",
        summary.job,
        summary.run_id,
        summary.status,
        seconds,
        summary.underlyings_succeeded,
        summary.underlyings_requested,
        summary.rows_written,
        summary.rows_rejected,
        summary.contracts_deactivated,
        summary.api_requests,
        "" if summary.recorded else " (not recorded: the database was away)",
        extra={"summary": summary.as_dict()},
    )


def write_metrics_textfile(path: Path, summary: RunSummary) -> None:
    """Write the run's figures to ``path`` in the Prometheus text format, atomically."""
    registry = CollectorRegistry()
    job = summary.job

    def gauge(name: str, help_text: str, value: float, **labels: str) -> None:
        names = ("job", *labels)
        metric = Gauge(f"{METRIC_PREFIX}_{name}", help_text, names, registry=registry)
        metric.labels(job, *labels.values()).set(value)

    gauge("last_run_id", "Ledger id of the last run", summary.run_id)
    status = Gauge(
        f"{METRIC_PREFIX}_last_run_status",
        "1 for the status the last run ended with, 0 for the others",
        ("job", "status"),
        registry=registry,
    )
    for name in STATUS_EXIT_CODES:
        status.labels(job, name).set(1 if summary.status == name else 0)
    gauge("last_run_exit_code", "Exit code of the last run", summary.exit_code)
    gauge("last_run_start_timestamp_seconds", "Start of the last run", _epoch(summary.started_at))
    if summary.seconds is not None:
        gauge("last_run_duration_seconds", "Duration of the last run", summary.seconds)
    for name, help_text in _COUNTS:
        gauge(f"last_run_{name}", help_text, getattr(summary, name))
    if summary.last_success_at is not None:
        gauge(
            "last_success_timestamp_seconds",
            "End of the last successful run",
            _epoch(summary.last_success_at),
        )
    write_to_textfile(str(path), registry)


def _epoch(moment: datetime) -> float:
    return moment.timestamp()
