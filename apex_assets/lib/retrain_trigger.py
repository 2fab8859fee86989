"""When inspector overrides should trigger a retraining, decided from a persisted cursor.

The weekly schedule retrains every Saturday. Between two Saturdays, the line may drift: the
inspectors then overturn the model more often. ``override_retrain_sensor`` asks for an early
retraining when, since the last trained model,

* the overrides reach ``APEX_RETRAIN_OVERRIDE_THRESHOLD`` (seed: 500), or
* the *critical misses* (model PASS, inspector FAIL: a defective part the model would have
  shipped) reach the lower ``APEX_RETRAIN_CRITICAL_MISS_THRESHOLD``.

Each tick reads only the override rows that arrived since the previous tick (``updated_at``
above the cursor's high-water mark, an indexed range scan) and adds them to the counts kept in
the cursor. When a newer model has been trained, the counts start again from that model's time.
A retraining is requested once per model: the run key names the model, and the cursor
remembers that it asked, so later ticks say why they skip instead of asking again.

Pure logic here (cursor, counting, decision); the Dagster sensor in
``apex_assets/defs/automation/retraining.py`` only wires it to the instance.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, replace

from apex_assets.lib.arrow_reader import read_frame
from apex_assets.lib.overrides import CRITICAL_MISS, kind_expr

__all__ = [
    "OverrideBatch",
    "RetrainCursor",
    "RetrainDecision",
    "advance",
    "decide",
    "for_model",
    "mark_requested",
    "read_new_overrides",
]


@dataclass(frozen=True)
class RetrainCursor:
    """What the sensor remembers between ticks (stored as JSON in Dagster's sensor cursor)."""

    #: identifies the last trained model (its materialization time, ISO); None = no model yet
    model_key: str | None = None
    #: newest ``updated_at`` of the override rows already counted (ISO), None = none read yet
    seen_until: str | None = None
    overrides: int = 0
    critical_misses: int = 0
    #: the model_key a retraining was already requested for
    requested_for: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | None) -> RetrainCursor:
        """The stored cursor; an empty or unreadable one starts afresh (counts from the model)."""
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            return cls(**{k: data.get(k) for k in cls.__dataclass_fields__ if k in data})
        except (ValueError, TypeError):
            return cls()


@dataclass(frozen=True)
class OverrideBatch:
    """Override rows that arrived since the cursor: counts and the new high-water mark."""

    overrides: int
    critical_misses: int
    seen_until: dt.datetime | None


@dataclass(frozen=True)
class RetrainDecision:
    request: bool
    reason: str
    #: "overrides" or "critical_misses" when ``request``
    trigger: str | None = None


def _ts(value: dt.datetime) -> str:
    if value.tzinfo is None:
        raise ValueError(f"timestamps must be timezone-aware, got {value!r}")
    return value.astimezone(dt.UTC).isoformat()


def read_new_overrides(
    uri: str, *, after: dt.datetime | None, since_model: dt.datetime | None
) -> OverrideBatch:
    """Overrides with ``updated_at > after`` and recorded at or after the model's time.

    ``after`` is the cursor's high-water mark (None: from the start); ``since_model`` the last
    trained model's time (None: no model yet, every override counts).
    """
    where = ["true"]
    if after is not None:
        where.append(f"updated_at > '{_ts(after)}'::timestamptz")
    if since_model is not None:
        where.append(f"updated_at >= '{_ts(since_model)}'::timestamptz")
    frame = read_frame(
        uri,
        "SELECT model_prediction, inspector_decision, updated_at "
        f"FROM inspection.inspection_overrides WHERE {' AND '.join(where)}",
    )
    if frame.is_empty():
        return OverrideBatch(0, 0, None)
    critical = frame.select((kind_expr() == CRITICAL_MISS).sum()).item()
    newest = frame.get_column("updated_at").max()
    if isinstance(newest, dt.datetime) and newest.tzinfo is None:
        newest = newest.replace(tzinfo=dt.UTC)
    return OverrideBatch(frame.height, int(critical), newest)


def for_model(cursor: RetrainCursor, model_key: str | None) -> RetrainCursor:
    """The cursor for the current model: a newer model restarts the counts (and the request)."""
    return cursor if model_key == cursor.model_key else RetrainCursor(model_key=model_key)


def advance(cursor: RetrainCursor, batch: OverrideBatch) -> RetrainCursor:
    """The cursor after counting ``batch``."""
    if batch.overrides == 0:
        return cursor
    return replace(
        cursor,
        overrides=cursor.overrides + batch.overrides,
        critical_misses=cursor.critical_misses + batch.critical_misses,
        seen_until=_ts(batch.seen_until) if batch.seen_until else cursor.seen_until,
    )


def mark_requested(cursor: RetrainCursor) -> RetrainCursor:
    """Remember that this model's retraining was requested (later ticks skip, saying so)."""
    return replace(cursor, requested_for=cursor.model_key or "")


def decide(
    cursor: RetrainCursor, *, override_threshold: int, critical_threshold: int
) -> RetrainDecision:
    """Request a retraining, or say why not (the sensor's skip reason)."""
    if override_threshold < 1 or critical_threshold < 1:
        raise ValueError("retraining thresholds must be >= 1")
    since = f"since the model trained at {cursor.model_key}" if cursor.model_key else "so far"
    counts = (
        f"{cursor.overrides} overrides (threshold {override_threshold}) and "
        f"{cursor.critical_misses} critical misses (threshold {critical_threshold}) {since}"
    )
    if cursor.requested_for is not None and cursor.requested_for == (cursor.model_key or ""):
        return RetrainDecision(False, f"retraining already requested for this model; {counts}")
    if cursor.critical_misses >= critical_threshold:
        return RetrainDecision(True, counts, "critical_misses")
    if cursor.overrides >= override_threshold:
        return RetrainDecision(True, counts, "overrides")
    if cursor.overrides == 0:
        return RetrainDecision(False, f"no inspector overrides {since}")
    return RetrainDecision(False, f"below thresholds: {counts}")
