"""Recent production images the active-learning queue chooses from, in two pools.

* *needs a class*: an inspector rejected a part the model passed (``PASS -> FAIL``) without
  naming the defect. It is a safety-critical miss whose label would teach the model most, and
  it cannot enter training until someone names the class, so the queue puts these first.
* *uncertain*: low-confidence answers of the production model that nobody overrode; the
  strategy (uncertainty, or diversity + uncertainty) chooses among them.

Images whose last override already labels them (a named class, or a good part) are in
neither pool: curation uses that label. Both pools come from one read of the prediction log
(``inspection.predictions``), the image's path (``inspection.image_metadata``) and its last
override.
"""

from __future__ import annotations

import datetime as dt

import polars as pl

from apex_assets.lib.arrow_reader import read_frame
from apex_assets.lib.curation import override_labels

__all__ = ["labelling_pools", "read_candidates"]


def _ts(value: dt.datetime) -> str:
    if value.tzinfo is None:
        raise ValueError(f"timestamps must be timezone-aware, got {value!r}")
    return value.astimezone(dt.UTC).isoformat()


def read_candidates(
    uri: str, *, start: dt.datetime, end: dt.datetime, max_confidence: float
) -> pl.DataFrame:
    """Production predictions in ``[start, end)`` that are below ``max_confidence`` or were
    overridden, newest per image, with the image's last override.

    Columns: image_id, image_path, camera_id, line_id, model_version, prediction,
    predicted_class, overall_confidence, probabilities (JSON text), predicted_at, override_id,
    inspector_decision, inspector_id, override_timestamp (the override columns null when none).
    """
    if not 0.0 < max_confidence <= 1.0:
        raise ValueError(f"max_confidence must be in (0, 1], got {max_confidence}")
    return read_frame(
        uri,
        f"""
        SELECT DISTINCT ON (p.image_id)
               p.image_id::text AS image_id, m.image_path, p.camera_id,
               COALESCE(m.line_id, 'unknown') AS line_id, p.model_version, p.prediction,
               p.predicted_class, p.overall_confidence, p.probabilities::text AS probabilities,
               p.predicted_at, o.override_id::text AS override_id, o.inspector_decision,
               o.inspector_id, o.override_timestamp
        FROM inspection.predictions p
        JOIN inspection.image_metadata m ON m.image_id = p.image_id
        LEFT JOIN LATERAL (
            SELECT override_id, inspector_decision, inspector_id, override_timestamp
            FROM inspection.inspection_overrides o
            WHERE o.image_id = p.image_id
            ORDER BY o.override_timestamp DESC, o.override_id DESC
            LIMIT 1
        ) o ON true
        WHERE NOT p.is_shadow
          AND p.predicted_at >= '{_ts(start)}'::timestamptz
          AND p.predicted_at < '{_ts(end)}'::timestamptz
          AND p.probabilities IS NOT NULL
          AND m.image_path IS NOT NULL
          AND (p.overall_confidence < {float(max_confidence)!r} OR o.override_id IS NOT NULL)
        ORDER BY p.image_id, p.predicted_at DESC
        """,
    )


def labelling_pools(candidates: pl.DataFrame) -> tuple[list[int], list[int]]:
    """Row indices of (needs a class, newest override first) and (uncertain, in row order)."""
    if candidates.is_empty():
        return [], []
    indexed = candidates.with_row_index("_row")
    overridden = indexed.filter(pl.col("override_id").is_not_null())
    needs_class = override_labels(overridden).needs_class
    first = (
        overridden.filter(pl.col("image_id").is_in(needs_class.implode()))
        .sort("override_timestamp", "image_id", descending=[True, False])
        .get_column("_row")
        .to_list()
    )
    uncertain = indexed.filter(pl.col("override_id").is_null()).get_column("_row").to_list()
    return [int(i) for i in first], [int(i) for i in uncertain]
