"""Operator switches of the serving fleet and the history of fired alerts, in PostgreSQL.

Why the source database: serving replicas, the Dagster checks and a person at the line all
need the same answer to "is auto-pass paused?", it must survive restarts, and the plant
already runs that database. A critical false-accept alert sets ``auto_pass_paused``; serving
reads it every minute and, while it is on, never passes a part on its own (every PASS goes to
a human). Only a person (or an explicit call) resumes it.

``inspection.monitoring_alerts`` holds one row per (alert, window_start): :func:`record_alert`
tells the caller whether the row is new, so re-running an hour never re-sends the alert.

Every statement is parameterised; control names are validated identifiers.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
import psycopg

from apex_assets.lib.alerts import AlertResult, to_utc

__all__ = [
    "AUTO_PASS_PAUSED",
    "ControlState",
    "auto_pass_paused",
    "mark_notified",
    "read_control",
    "recent_alerts",
    "record_alert",
    "set_control",
]

#: the switch a critical FAR alert turns on: the model may not PASS a part on its own
AUTO_PASS_PAUSED = "auto_pass_paused"

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_CONNECT_TIMEOUT_S = 10

_ALERT_SCHEMA = {
    "alert": pl.String,
    "window_start": pl.Datetime("us", "UTC"),
    "window_end": pl.Datetime("us", "UTC"),
    "severity": pl.String,
    "value": pl.Float64,
    "threshold": pl.Float64,
    "message": pl.String,
    "notified_via": pl.List(pl.String),
    "created_at": pl.Datetime("us", "UTC"),
    "updated_at": pl.Datetime("us", "UTC"),
}

# union of the stored and the new channels, sorted, without duplicates
_MERGE_CHANNELS = (
    "ARRAY(SELECT DISTINCT c FROM unnest("
    "coalesce(inspection.monitoring_alerts.notified_via, '{}'::text[]) || %s::text[]"
    ") AS c ORDER BY c)"
)


@dataclass(frozen=True)
class ControlState:
    """One switch: on or off, why, who set it, when (UTC)."""

    name: str
    enabled: bool
    reason: str | None
    set_by: str | None
    set_at: dt.datetime


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"invalid control name {name!r}: use a lowercase identifier (a-z, 0-9, _)")
    return name


def _connect(uri: str) -> psycopg.Connection:
    return psycopg.connect(uri, connect_timeout=_CONNECT_TIMEOUT_S)


def _state(row: tuple) -> ControlState:
    name, enabled, reason, set_by, set_at = row
    return ControlState(name, bool(enabled), reason, set_by, to_utc(set_at))


def read_control(uri: str, name: str) -> ControlState | None:
    """The switch's current state, or None if it was never set."""
    _check_name(name)
    with _connect(uri) as conn:
        row = conn.execute(
            "SELECT control, enabled, reason, set_by, set_at "
            "FROM inspection.serving_controls WHERE control = %s",
            (name,),
        ).fetchone()
    return None if row is None else _state(row)


def set_control(uri: str, name: str, enabled: bool, *, reason: str, set_by: str) -> ControlState:
    """Turn a switch on or off (upsert); ``set_at`` becomes now. Returns the stored state.

    ``reason`` and ``set_by`` are required: a paused line must say why and who did it.
    """
    _check_name(name)
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    for what, text in (("reason", reason), ("set_by", set_by)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{what} must be a non-empty string")
    with _connect(uri) as conn:
        row = conn.execute(
            "INSERT INTO inspection.serving_controls (control, enabled, reason, set_by, set_at) "
            "VALUES (%s, %s, %s, %s, clock_timestamp()) "
            "ON CONFLICT (control) DO UPDATE SET enabled = EXCLUDED.enabled, "
            "reason = EXCLUDED.reason, set_by = EXCLUDED.set_by, set_at = EXCLUDED.set_at "
            "RETURNING control, enabled, reason, set_by, set_at",
            (name, enabled, reason.strip(), set_by.strip()),
        ).fetchone()
    assert row is not None
    return _state(row)


def auto_pass_paused(uri: str) -> ControlState | None:
    """The pause's state while auto-pass is paused, None when the model may pass parts."""
    state = read_control(uri, AUTO_PASS_PAUSED)
    return state if state is not None and state.enabled else None


def _channels(channels: Sequence[str]) -> list[str]:
    if isinstance(channels, str):
        raise ValueError("channels must be a sequence of channel names, not a string")
    out = sorted({str(c).strip() for c in channels if str(c).strip()})
    return out


def record_alert(uri: str, alert: AlertResult, notified_via: Sequence[str] = ()) -> bool:
    """Store a fired alert; True when its (alert, window_start) row is new.

    The caller notifies only on True, so re-running an hour never re-sends an alert. A re-run
    refreshes the numbers (value, message, ...) and keeps the channels already notified.
    """
    if not alert.fired:
        raise ValueError(f"only fired alerts are recorded; {alert.name} did not fire")
    channels = _channels(notified_via)
    with _connect(uri) as conn:
        row = conn.execute(
            "INSERT INTO inspection.monitoring_alerts "
            "(alert, window_start, window_end, severity, value, threshold, message, notified_via) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::text[]) "
            "ON CONFLICT (alert, window_start) DO UPDATE SET "
            "window_end = EXCLUDED.window_end, severity = EXCLUDED.severity, "
            "value = EXCLUDED.value, threshold = EXCLUDED.threshold, "
            f"message = EXCLUDED.message, notified_via = {_MERGE_CHANNELS} "
            # xmax is 0 on a freshly inserted row version, non-zero on an updated one
            "RETURNING (xmax = 0) AS inserted",
            (
                alert.name,
                to_utc(alert.window_start),
                to_utc(alert.window_end),
                alert.severity,
                alert.value,
                alert.threshold,
                alert.message,
                channels,
                channels,
            ),
        ).fetchone()
    assert row is not None
    return bool(row[0])


def mark_notified(uri: str, alert: AlertResult, channels: Sequence[str]) -> None:
    """Add the channels that delivered ``alert`` to its row (kept sorted, no duplicates)."""
    merged = _channels(channels)
    with _connect(uri) as conn:
        cur = conn.execute(
            f"UPDATE inspection.monitoring_alerts SET notified_via = {_MERGE_CHANNELS} "
            "WHERE alert = %s AND window_start = %s",
            (merged, alert.name, to_utc(alert.window_start)),
        )
        if cur.rowcount == 0:
            raise ValueError(
                f"alert {alert.name} for {to_utc(alert.window_start).isoformat()} is not "
                "recorded; call record_alert first"
            )


def recent_alerts(uri: str, since: dt.datetime) -> pl.DataFrame:
    """Fired alerts whose window starts at or after ``since``, newest window first."""
    with _connect(uri) as conn:
        rows = conn.execute(
            "SELECT alert, window_start, window_end, severity, value, threshold, message, "
            "notified_via, created_at, updated_at FROM inspection.monitoring_alerts "
            "WHERE window_start >= %s ORDER BY window_start DESC, created_at DESC, alert",
            (to_utc(since),),
        ).fetchall()
    utc_rows = [tuple(to_utc(v) if isinstance(v, dt.datetime) else v for v in row) for row in rows]
    return pl.DataFrame(utc_rows, schema=_ALERT_SCHEMA, orient="row")
