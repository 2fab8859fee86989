"""Dagster metadata values shared by the asset modules (charts inline in markdown)."""

import base64

import dagster as dg


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    """A PNG shown inline in the Dagster UI (markdown with a data URI)."""
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def log_png(client, run_id: str, png: bytes, name: str) -> None:
    """Attach a PNG to an MLflow run (``client`` is an ``mlflow.MlflowClient``)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(png)
        client.log_artifact(run_id, str(path))
