"""Serving switches and the alert history in a real PostgreSQL (embedded server, fresh DB)."""

from __future__ import annotations

import datetime as dt

import polars as pl
import psycopg
import pytest

from apex_assets.lib.alerts import confidence_alert, far_alert, latency_alert
from apex_assets.lib.serving_controls import (
    AUTO_PASS_PAUSED,
    auto_pass_paused,
    mark_notified,
    read_control,
    recent_alerts,
    record_alert,
    set_control,
)

H0 = dt.datetime(2026, 12, 1, 14, 0, tzinfo=dt.UTC)
H1 = dt.datetime(2026, 12, 1, 15, 0, tzinfo=dt.UTC)
H2 = dt.datetime(2026, 12, 1, 16, 0, tzinfo=dt.UTC)


def _alert_rows(uri: str) -> int:
    with psycopg.connect(uri) as conn:
        return conn.execute("SELECT count(*) FROM inspection.monitoring_alerts").fetchone()[0]


def test_pause_and_resume_auto_pass(source_db_uri):
    uri = source_db_uri
    assert read_control(uri, AUTO_PASS_PAUSED) is None
    assert auto_pass_paused(uri) is None

    paused = set_control(
        uri, AUTO_PASS_PAUSED, True, reason="FAR 1.52% > 1.00%", set_by="monitoring_metrics"
    )
    assert paused.name == "auto_pass_paused"
    assert paused.enabled is True
    assert paused.reason == "FAR 1.52% > 1.00%"
    assert paused.set_by == "monitoring_metrics"
    assert paused.set_at.tzinfo is dt.UTC
    assert read_control(uri, AUTO_PASS_PAUSED) == paused
    assert auto_pass_paused(uri) == paused

    resumed = set_control(uri, AUTO_PASS_PAUSED, False, reason="root cause fixed", set_by="qa.lead")
    assert resumed.enabled is False
    assert resumed.set_by == "qa.lead"
    assert resumed.set_at > paused.set_at
    assert read_control(uri, AUTO_PASS_PAUSED) == resumed
    assert auto_pass_paused(uri) is None

    with psycopg.connect(uri) as conn:
        rows = conn.execute(
            "SELECT count(*), bool_or(enabled) FROM inspection.serving_controls"
        ).fetchone()
    assert rows == (1, False)  # an upsert, not a second row


def test_controls_validate_name_and_audit_fields(source_db_uri):
    with pytest.raises(ValueError, match="lowercase identifier"):
        read_control(source_db_uri, "Auto-Pass; DROP TABLE x")
    with pytest.raises(ValueError, match="reason"):
        set_control(source_db_uri, AUTO_PASS_PAUSED, True, reason=" ", set_by="me")
    with pytest.raises(ValueError, match="enabled"):
        set_control(source_db_uri, AUTO_PASS_PAUSED, 1, reason="x", set_by="me")  # type: ignore[arg-type]


def test_record_alert_is_new_once_per_window(source_db_uri):
    uri = source_db_uri
    first = far_alert(3 / 197, 3, 197, threshold=0.01, window_start=H0, window_end=H1)
    assert record_alert(uri, first) is True
    assert _alert_rows(uri) == 1

    # re-running the hour (numbers refreshed) is not a new alert
    rerun = far_alert(4 / 200, 4, 200, threshold=0.01, window_start=H0, window_end=H1)
    assert record_alert(uri, rerun, notified_via=["log"]) is False
    assert _alert_rows(uri) == 1

    frame = recent_alerts(uri, H0)
    assert frame.height == 1
    row = frame.row(0, named=True)
    assert row["alert"] == "false_accept_rate"
    assert row["severity"] == "critical"
    assert row["value"] == pytest.approx(0.02)
    assert row["threshold"] == 0.01
    assert row["message"].startswith("FAR 2.00% > 1.00% (4 of 200")
    assert row["window_start"] == H0
    assert row["window_end"] == H1
    assert row["notified_via"] == ["log"]

    # the next hour is a new alert
    assert record_alert(uri, far_alert(0.5, 1, 2, threshold=0.01, window_start=H1, window_end=H2))
    assert _alert_rows(uri) == 2


def test_mark_notified_merges_channels(source_db_uri):
    uri = source_db_uri
    alert = confidence_alert(0.80, 500, threshold=0.85, window_start=H0, window_end=H1)
    assert record_alert(uri, alert)
    assert recent_alerts(uri, H0)["notified_via"].to_list() == [[]]
    mark_notified(uri, alert, ["webhook", "log"])
    mark_notified(uri, alert, ["log", "email"])
    record_alert(uri, alert)  # a re-run without channels keeps the ones recorded
    assert recent_alerts(uri, H0)["notified_via"].to_list() == [["email", "log", "webhook"]]

    other = confidence_alert(0.80, 500, threshold=0.85, window_start=H1, window_end=H2)
    with pytest.raises(ValueError, match="record_alert first"):
        mark_notified(uri, other, ["log"])


def test_only_fired_alerts_are_recorded(source_db_uri):
    quiet = far_alert(0.01, 2, 200, threshold=0.01, window_start=H0, window_end=H1)
    with pytest.raises(ValueError, match="did not fire"):
        record_alert(source_db_uri, quiet)
    assert _alert_rows(source_db_uri) == 0


def test_recent_alerts_newest_first_and_since(source_db_uri):
    uri = source_db_uri
    earlier = H0 - dt.timedelta(hours=3)
    per_minute = pl.DataFrame(
        {
            "minute": [H1 + dt.timedelta(minutes=m) for m in range(5)],
            "requests": [10] * 5,
            "p99_ms": [450.0] * 5,
        }
    )
    latency = latency_alert(per_minute, limit_ms=200, minutes=5, window_start=H1, window_end=H2)
    far_old = far_alert(
        0.5, 1, 2, threshold=0.01, window_start=earlier, window_end=earlier + dt.timedelta(hours=1)
    )
    far_now = far_alert(0.5, 1, 2, threshold=0.01, window_start=H0, window_end=H1)
    for alert in (far_now, latency, far_old):  # recorded out of order
        assert record_alert(uri, alert)

    frame = recent_alerts(uri, earlier)
    assert frame.select("alert", "window_start").rows() == [
        ("latency_p99", H1),
        ("false_accept_rate", H0),
        ("false_accept_rate", earlier),
    ]
    assert frame.schema["window_start"] == pl.Datetime("us", "UTC")
    assert frame["severity"].to_list() == ["high", "critical", "critical"]
    assert frame["value"][0] == 450.0

    assert recent_alerts(uri, H0)["alert"].to_list() == ["latency_p99", "false_accept_rate"]
    empty = recent_alerts(uri, H2)
    assert empty.is_empty()
    assert empty.columns == frame.columns
