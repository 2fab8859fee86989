"""Dagster resources: the plant source database and the lake.

Both default to embedded, nothing-to-install components and switch to real
servers through configuration (see ``apex_assets/config.py``).
"""

from pathlib import Path

import dagster as dg
import polars as pl
from dagster_aws.s3 import S3Resource
from pydantic import Field

from apex_assets.config import Settings, load_settings
from apex_assets.lib import source_db
from apex_assets.lib.lake import Lake, LocalLake, S3Lake
from apex_assets.lib.tracking import MlflowTarget


class SourceDatabaseResource(dg.ConfigurableResource):
    """The plant's ``quality_vision`` PostgreSQL database.

    ``url`` set: a real server (the plant's). Unset: the embedded server in
    ``embedded_dir`` is started on first use (under a second) and the plant
    schema is created in it, so a fresh checkout can run every asset.
    """

    url: str | None = Field(default=None, description="PostgreSQL URL; None = embedded server")
    embedded_dir: str = Field(description="Data folder of the embedded server")
    database: str = Field(default="quality_vision", description="Database of the embedded server")

    def uri(self) -> str:
        if self.url:
            return self.url
        uri = source_db.resolve_source_uri(None, Path(self.embedded_dir), self.database)
        source_db.ensure_schema(uri)
        return uri


class LakeResource(dg.ConfigurableResource):
    """Where raw tables, quarantine and later artefacts are stored: a folder, or S3."""

    local_dir: str = Field(description="Lake folder when no bucket is set")
    s3_bucket: str | None = Field(default=None, description="S3 bucket; set = lake on S3")
    s3_prefix: str = Field(default="apex-lake", description="Key prefix inside the bucket")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint URL")
    s3_region: str | None = Field(default=None, description="S3 region")

    def get_lake(self) -> Lake:
        if self.s3_bucket:
            client = S3Resource(
                endpoint_url=self.s3_endpoint_url, region_name=self.s3_region
            ).get_client()
            return S3Lake(client, self.s3_bucket, self.s3_prefix)
        return LocalLake(Path(self.local_dir))

    def describe(self) -> str:
        if self.s3_bucket:
            return f"s3://{self.s3_bucket}/{self.s3_prefix}"
        return self.local_dir


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking and model registry.

    Why not dagster-mlflow: it ships only a legacy function resource that starts a run
    for the whole Dagster run; the training code already manages its runs (Lightning's
    MLFlowLogger, nested comparison runs), so this resource only says where MLflow is.
    Default: a SQLite store and an artifact folder in ``APEX_HOME``; production: an
    MLflow server URL with S3 artifacts.
    """

    tracking_uri: str = Field(description="MLflow tracking URI (sqlite:///..., http://...)")
    artifact_location: str = Field(description="Artifact root of a newly created experiment")
    experiment: str = Field(default="visual_quality_inspection", description="Experiment name")
    registered_model: str = Field(
        default="visual_quality_inspector", description="Registered model name"
    )

    def target(self) -> MlflowTarget:
        return MlflowTarget(
            tracking_uri=self.tracking_uri,
            experiment=self.experiment,
            registered_model=self.registered_model,
            artifact_location=self.artifact_location,
        )

    def ui_hint(self) -> str:
        """Where a person looks at the runs."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return self.tracking_uri
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"


def build_resources(settings: Settings | None = None) -> dict[str, object]:
    settings = settings or load_settings()
    lake = LakeResource(
        local_dir=str(settings.lake_dir),
        s3_bucket=settings.s3_bucket,
        s3_prefix=settings.s3_prefix,
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_region=settings.s3_region,
    )
    return {
        "source_db": SourceDatabaseResource(
            url=settings.source_db_url,
            embedded_dir=str(settings.embedded_pg_dir),
            database=settings.source_db_name,
        ),
        "lake": lake,
        "lake_io": LakeParquetIOManager(lake=lake),
        "mlflow": MlflowResource(
            tracking_uri=settings.mlflow_tracking_uri,
            artifact_location=settings.mlflow_artifact_location,
            experiment=settings.mlflow_experiment,
            registered_model=settings.registered_model,
        ),
    }


class LakeParquetIOManager(dg.ConfigurableIOManager):
    """Stores Polars DataFrame outputs as ``curated/<asset key>.parquet`` in the lake.

    Why an IO manager: the curation and later assets pass tables to each other;
    Dagster then owns where they live (folder or S3, whatever the lake is) and
    downstream assets just take a DataFrame argument.
    """

    lake: dg.ResourceDependency[LakeResource]

    def _key(self, context: dg.OutputContext | dg.InputContext) -> str:
        return "curated/" + "/".join(context.asset_key.path) + ".parquet"

    def handle_output(self, context: dg.OutputContext, obj: pl.DataFrame) -> None:
        if not isinstance(obj, pl.DataFrame):
            raise TypeError(f"{context.asset_key.to_user_string()} must return a polars DataFrame")
        self.lake.get_lake().write(self._key(context), obj)
        context.add_output_metadata(
            {
                "dagster/row_count": obj.height,
                "dagster/column_schema": dg.TableSchema(
                    columns=[dg.TableColumn(n, str(t)) for n, t in obj.schema.items()]
                ),
                "lake_key": self._key(context),
            }
        )

    def load_input(self, context: dg.InputContext) -> pl.DataFrame:
        frame = self.lake.get_lake().read(self._key(context))
        if frame is None:
            raise FileNotFoundError(
                f"{context.asset_key.to_user_string()} has not been materialized into the lake "
                f"({self._key(context)}); materialize it first"
            )
        return frame
