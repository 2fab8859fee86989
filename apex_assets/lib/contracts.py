"""Data contracts (pandera, Polars backend) for the raw source tables.

Primary keys are not re-checked for uniqueness here: each batch is one
SELECT on a table whose primary key PostgreSQL enforces (a 1M-row uniqueness
check cost 0.4 s and could never fail).

Why contracts at ingestion: the plant database enforces keys but not values
(a confidence of 7, a decision of "MAYBE", a box of negative width all reach
it). Every batch is validated here; rows that break a *row* rule are
quarantined with the reason (nothing is lost, the rest lands), while a broken
*table* rule (a missing column, a wrong type) means the source changed shape
and the run fails loudly instead of writing garbage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pandera.polars as pa
import polars as pl
from pandera.errors import SchemaErrors
from pandera.typing.polars import Series  # noqa: F401  (pandera resolves annotations)

#: timestamptz as ADBC delivers it.
UtcTimestamp = Annotated[pl.Datetime, "us", "UTC"]

#: uuid columns arrive as ``uuid::text``: PostgreSQL guarantees their form, a length check
#: catches a source that changed the type (a regex cost 0.2 s per 1M rows for nothing).
UUID_TEXT = {"min_value": 36, "max_value": 36}
DECISIONS = ["PASS", "FAIL", "REWORK"]


class _Base(pa.DataFrameModel):
    updated_at: UtcTimestamp = pa.Field(nullable=False)

    class Config:
        strict = False  # extra source columns are kept, not rejected
        coerce = False


class ImageMetadataContract(_Base):
    image_id: str = pa.Field(str_length=UUID_TEXT)
    capture_timestamp: UtcTimestamp = pa.Field(nullable=False)
    capture_date: pl.Date = pa.Field(nullable=False)
    camera_id: str = pa.Field(nullable=False, str_length={"min_value": 1})
    image_path: str = pa.Field(nullable=False, str_length={"min_value": 1})
    width: pl.Int32 = pa.Field(nullable=True, gt=0, le=20_000)
    height: pl.Int32 = pa.Field(nullable=True, gt=0, le=20_000)

    @pa.check("image_path", name="path_inside_image_root")
    def _path_confined(cls, data: pa.PolarsData) -> pl.LazyFrame:
        col = pl.col(data.key).str.replace_all("\\\\", "/")
        return data.lazyframe.select(
            ~(
                col.str.starts_with("/")
                | col.str.contains(r"(^|/)\.\.(/|$)")
                | col.str.contains(r"^[A-Za-z]:")
                | col.str.contains("\x00", literal=True)
            )
        )


class DefectAnnotationContract(_Base):
    annotation_id: str = pa.Field(str_length=UUID_TEXT)
    image_id: str = pa.Field(str_length=UUID_TEXT)
    capture_date: pl.Date = pa.Field(nullable=False)
    defect_type: str = pa.Field(nullable=False, str_length={"min_value": 1})
    confidence: pl.Int32 = pa.Field(nullable=False, ge=1, le=5)
    box_x: pl.Float64 = pa.Field(nullable=True, ge=0)
    box_y: pl.Float64 = pa.Field(nullable=True, ge=0)
    box_width: pl.Float64 = pa.Field(nullable=True, gt=0)
    box_height: pl.Float64 = pa.Field(nullable=True, gt=0)

    @pa.dataframe_check(name="bounding_box_has_x_y_width_height")
    def _box_complete(cls, data: pa.PolarsData) -> pl.LazyFrame:
        box_cols = [pl.col(c).is_not_null() for c in ("box_x", "box_y", "box_width", "box_height")]
        return data.lazyframe.select(pl.col("bounding_box").is_null() | pl.all_horizontal(box_cols))


class InspectionResultContract(_Base):
    result_id: str = pa.Field(str_length=UUID_TEXT)
    image_id: str = pa.Field(str_length=UUID_TEXT)
    capture_date: pl.Date = pa.Field(nullable=False)
    decision: str = pa.Field(isin=DECISIONS)


class InspectionOverrideContract(_Base):
    override_id: str = pa.Field(str_length=UUID_TEXT)
    image_id: str = pa.Field(str_length=UUID_TEXT)
    capture_date: pl.Date = pa.Field(nullable=False)
    inspector_decision: str = pa.Field(nullable=False, str_length={"min_value": 1})
    override_timestamp: UtcTimestamp = pa.Field(nullable=False)


class CameraCalibrationContract(_Base):
    camera_id: str = pa.Field(nullable=False, str_length={"min_value": 1})
    valid_from: UtcTimestamp = pa.Field(nullable=False)
    focal_length_mm: pl.Float64 = pa.Field(nullable=True, gt=0)
    exposure_us: pl.Int32 = pa.Field(nullable=True, gt=0)
    resolution_w: pl.Int32 = pa.Field(nullable=True, gt=0)
    resolution_h: pl.Int32 = pa.Field(nullable=True, gt=0)


class EquipmentRegistryContract(_Base):
    machine_id: str = pa.Field(str_length={"min_value": 1})
    plant_id: str = pa.Field(nullable=False, str_length={"min_value": 1})
    line_id: str = pa.Field(nullable=False, str_length={"min_value": 1})


class ProductionOrderContract(_Base):
    production_order_id: str = pa.Field(str_length={"min_value": 1})
    part_type: str = pa.Field(nullable=False, str_length={"min_value": 1})
    quantity: pl.Int32 = pa.Field(nullable=True, ge=0)


class ContractViolation(RuntimeError):
    """The batch as a whole breaks the contract (schema drift): fail the run, write nothing."""


@dataclass(frozen=True)
class ValidationOutcome:
    valid: pl.DataFrame
    quarantined: pl.DataFrame  # the offending rows plus a ``quarantine_reason`` column

    @property
    def quarantined_count(self) -> int:
        return self.quarantined.height


def validate_batch(contract: type[pa.DataFrameModel], frame: pl.DataFrame) -> ValidationOutcome:
    """Split ``frame`` into rows that honour ``contract`` and quarantined rows with reasons.

    A failure pandera cannot pin to a row (missing column, wrong dtype) raises
    :class:`ContractViolation`: that is schema drift, not a bad row.
    """
    if frame.is_empty():
        return ValidationOutcome(
            frame, frame.with_columns(quarantine_reason=pl.lit(None, pl.String))
        )
    try:
        contract.validate(frame, lazy=True)
    except SchemaErrors as err:
        cases = err.failure_cases
        table_level = cases.filter(pl.col("index").is_null())
        if table_level.height:
            details = "; ".join(
                f"{r['column']}: {r['check']} ({r['failure_case']})"
                for r in table_level.head(10).iter_rows(named=True)
            )
            raise ContractViolation(
                f"{contract.__name__} broken by the whole batch: {details}"
            ) from err
        reasons = (
            cases.with_columns(
                reason=pl.concat_str(
                    [
                        pl.col("column").fill_null("row"),
                        pl.lit(": "),
                        pl.col("check"),
                        pl.lit(" (got "),
                        pl.col("failure_case").cast(pl.String).fill_null("null"),
                        pl.lit(")"),
                    ]
                )
            )
            .group_by("index")
            .agg(pl.col("reason").unique().sort().str.join("; ").alias("quarantine_reason"))
            .rename({"index": "__row"})
            .with_columns(pl.col("__row").cast(pl.UInt32))
        )
        indexed = frame.with_row_index("__row")
        bad = indexed.join(reasons, on="__row", how="inner").sort("__row").drop("__row")
        good = indexed.join(reasons, on="__row", how="anti").drop("__row")
        return ValidationOutcome(good, bad)
    return ValidationOutcome(
        frame, frame.head(0).with_columns(quarantine_reason=pl.lit(None, pl.String))
    )
