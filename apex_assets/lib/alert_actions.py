"""What happens when a monitoring alert fires: record it once, notify once, pause auto-pass.

An hourly partition can be materialized again (a late override arrives, an operator re-runs a
day); the alert it computes is then the same alert. It is recorded in
``inspection.monitoring_alerts`` keyed by (alert, window start), and only a *new* record is
sent to the notifiers, so nobody is paged twice for one hour.

A false-accept alert also pauses auto-pass (``inspection.serving_controls``), which serving
obeys within a minute: the model keeps rejecting parts but every PASS goes to a person. Only
an alert about the recent past pauses the line: a backfill of last month's hours records its
alerts but must not stop today's production. A person resumes auto-pass
(``apex auto-pass resume``); nothing resumes it automatically.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from apex_assets.lib.alerts import AlertResult
from apex_assets.lib.notify import CompositeNotifier
from apex_assets.lib.serving_controls import (
    AUTO_PASS_PAUSED,
    mark_notified,
    record_alert,
    set_control,
)

__all__ = ["FAR_ALERT", "PAUSE_LOOKBACK", "AlertOutcome", "act_on_alerts"]

#: the alert that pauses auto-pass
FAR_ALERT = "false_accept_rate"
#: how recent a FAR alert's window must end to pause the line
PAUSE_LOOKBACK = dt.timedelta(hours=3)


@dataclass(frozen=True)
class AlertOutcome:
    alert: AlertResult
    #: first time this alert was recorded for its window
    new: bool
    #: notifier channels that delivered it (empty when not new or not fired)
    channels: tuple[str, ...]
    #: this alert paused auto-pass
    paused: bool


def act_on_alerts(
    uri: str,
    alerts: Sequence[AlertResult],
    notifier: CompositeNotifier,
    *,
    now: dt.datetime,
    set_by: str = "monitoring_metrics",
) -> list[AlertOutcome]:
    """Record, notify and (for a recent FAR alert) pause; not-fired alerts are passed through."""
    outcomes = []
    for alert in alerts:
        if not alert.fired:
            outcomes.append(AlertOutcome(alert, False, (), False))
            continue
        new = record_alert(uri, alert)
        channels: tuple[str, ...] = ()
        paused = False
        if new:
            if alert.name == FAR_ALERT and alert.window_end >= now - PAUSE_LOOKBACK:
                set_control(uri, AUTO_PASS_PAUSED, True, reason=alert.message, set_by=set_by)
                paused = True
            channels = tuple(notifier.notify(alert))
            mark_notified(uri, alert, channels)
        outcomes.append(AlertOutcome(alert, new, channels, paused))
    return outcomes
