"""Alert actions on a real PostgreSQL: record once, notify once, pause auto-pass when recent."""

from __future__ import annotations

import datetime as dt

from apex_assets.lib.alert_actions import act_on_alerts
from apex_assets.lib.alerts import AlertResult, confidence_alert, far_alert
from apex_assets.lib.notify import CompositeNotifier
from apex_assets.lib.serving_controls import (
    AUTO_PASS_PAUSED,
    read_control,
    recent_alerts,
    set_control,
)

NOW = dt.datetime(2026, 12, 1, 15, 10, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


class Recording:
    """A notifier channel that keeps what it was sent (the pluggable Notifier interface)."""

    channel = "recording"

    def __init__(self) -> None:
        self.sent: list[AlertResult] = []

    def send(self, alert: AlertResult) -> None:
        self.sent.append(alert)


def _far(start: dt.datetime, far: float) -> AlertResult:
    return far_alert(
        far, int(far * 100), 100, threshold=0.01, window_start=start, window_end=start + HOUR
    )


def test_a_fired_far_alert_is_recorded_notified_once_and_pauses(source_db_uri: str) -> None:
    channel = Recording()
    notifier = CompositeNotifier([channel])
    start = NOW.replace(minute=0) - HOUR
    quiet = confidence_alert(0.93, 500, threshold=0.85, window_start=start, window_end=start + HOUR)
    outcomes = act_on_alerts(source_db_uri, [_far(start, 0.03), quiet], notifier, now=NOW)
    assert [(o.new, o.channels, o.paused) for o in outcomes] == [
        (True, ("recording",), True),
        (False, (), False),
    ]
    assert [a.name for a in channel.sent] == ["false_accept_rate"]
    state = read_control(source_db_uri, AUTO_PASS_PAUSED)
    assert state is not None and state.enabled and state.set_by == "monitoring_metrics"
    assert "3.00%" in (state.reason or "")
    recorded = recent_alerts(source_db_uri, start - HOUR)
    assert recorded.height == 1 and recorded["notified_via"][0].to_list() == ["recording"]

    # the same hour again (a re-run): nothing new, nobody paged twice, an operator's resume stands
    set_control(source_db_uri, AUTO_PASS_PAUSED, False, reason="checked", set_by="qa")
    again = act_on_alerts(source_db_uri, [_far(start, 0.03)], notifier, now=NOW)
    assert [(o.new, o.paused) for o in again] == [(False, False)]
    assert len(channel.sent) == 1
    assert not read_control(source_db_uri, AUTO_PASS_PAUSED).enabled


def test_an_old_hour_records_and_notifies_but_does_not_pause_today(source_db_uri: str) -> None:
    channel = Recording()
    old = NOW - dt.timedelta(days=30)
    (outcome,) = act_on_alerts(
        source_db_uri, [_far(old, 0.05)], CompositeNotifier([channel]), now=NOW
    )
    assert outcome.new and not outcome.paused and len(channel.sent) == 1
    assert read_control(source_db_uri, AUTO_PASS_PAUSED) is None


def test_a_not_fired_alert_touches_nothing(source_db_uri: str) -> None:
    channel = Recording()
    start = NOW.replace(minute=0) - HOUR
    (outcome,) = act_on_alerts(
        source_db_uri, [_far(start, 0.01)], CompositeNotifier([channel]), now=NOW
    )
    assert not outcome.alert.fired and not outcome.new and not channel.sent
    assert recent_alerts(source_db_uri, start - HOUR).height == 0
    assert read_control(source_db_uri, AUTO_PASS_PAUSED) is None
