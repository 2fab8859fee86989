"""Where MLflow lives: tracking URI, experiment, registered model, artifact root.

A module of its own, free of torch and mlflow imports, because the Dagster resources
(loaded with the definitions) need the type and must stay light to import.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MlflowTarget:
    """An MLflow tracking store and the names the platform uses in it."""

    tracking_uri: str
    experiment: str = "visual_quality_inspection"
    registered_model: str = "visual_quality_inspector"
    artifact_location: str | None = None
    """Used when the experiment is created: a folder or s3:// URI (a SQLite store would
    otherwise put artifacts in ./mlruns of whatever directory the process started in)."""
