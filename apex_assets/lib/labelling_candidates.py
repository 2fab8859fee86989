"""Recent production predictions the active-learning queue chooses from.

Low-confidence answers of the production model are where a label teaches the model most; the
queue reads them from the prediction log (``inspection.predictions``) with the image's path
(``inspection.image_metadata``) so that the chosen images can be embedded and labelled.
Images an inspector already overrode are left out: their label is known.
"""

from __future__ import annotations

import datetime as dt

import polars as pl

from apex_assets.lib.arrow_reader import read_frame

__all__ = ["read_candidates"]


def _ts(value: dt.datetime) -> str:
    if value.tzinfo is None:
        raise ValueError(f"timestamps must be timezone-aware, got {value!r}")
    return value.astimezone(dt.UTC).isoformat()


def read_candidates(
    uri: str, *, start: dt.datetime, end: dt.datetime, max_confidence: float
) -> pl.DataFrame:
    """Production predictions in ``[start, end)`` below ``max_confidence``, newest per image.

    Columns: image_id, image_path, camera_id, line_id, model_version, prediction,
    predicted_class, overall_confidence, probabilities (JSON text), predicted_at.
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
               p.predicted_at
        FROM inspection.predictions p
        JOIN inspection.image_metadata m ON m.image_id = p.image_id
        WHERE NOT p.is_shadow
          AND p.predicted_at >= '{_ts(start)}'::timestamptz
          AND p.predicted_at < '{_ts(end)}'::timestamptz
          AND p.overall_confidence < {float(max_confidence)!r}
          AND p.probabilities IS NOT NULL
          AND m.image_path IS NOT NULL
          AND NOT EXISTS (
              SELECT 1 FROM inspection.inspection_overrides o WHERE o.image_id = p.image_id
          )
        ORDER BY p.image_id, p.predicted_at DESC
        """,
    )
