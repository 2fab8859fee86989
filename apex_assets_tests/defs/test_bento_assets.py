"""deployed_bento (shadow first), shadow_comparison and the explicit production promotion.

Real components: MLflow registry (SQLite), the lake on disk, a BentoML store in tmp_path
(bentos really built), the embedded PostgreSQL with predictions logged as the service logs them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import dagster as dg
import polars as pl
import psycopg
import pytest
from mlflow import MlflowClient

from apex_assets.defs.deployment.bento import (
    PRODUCTION_ALIAS,
    SHADOW_ALIAS,
    deployed_bento,
    production_model,
    shadow_comparison,
)
from apex_assets.defs.resources import LakeResource, MlflowResource, SourceDatabaseResource
from apex_assets.lib.lake import LocalLake
from apex_assets.lib.model_package import package_lake_keys
from apex_assets.lib.registry import alias_version
from apex_assets_tests.lib.test_serving_model import make_package

NAME = "visual_quality_inspector"


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source_db_uri: str):
    monkeypatch.setenv("APEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("APEX_SHADOW_MIN_REQUESTS", "4")
    monkeypatch.setenv("APEX_SHADOW_MIN_AGREEMENT", "0.75")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(NAME)
    lake_dir = tmp_path / "lake"
    lake = LocalLake(lake_dir)
    for version in ("1", "2"):
        client.create_model_version(NAME, source=str(tmp_path / f"src{version}"), run_id=None)
        make_package(tmp_path / f"pkg{version}", version=version)
        for name, key in package_lake_keys(NAME, version).items():
            lake.upload_file(key, tmp_path / f"pkg{version}" / name)
    resources = {
        "mlflow": MlflowResource(
            tracking_uri=uri, artifact_location=str(tmp_path / "art"), registered_model=NAME
        ),
        "lake": LakeResource(local_dir=str(lake_dir)),
        "source_db": SourceDatabaseResource(
            url=source_db_uri, embedded_dir=str(tmp_path / "pg"), database="unused"
        ),
    }
    return resources, source_db_uri, tmp_path


def _onnx_row(version: str) -> pl.DataFrame:
    return pl.DataFrame({"registered_model": [NAME], "model_version": [version]})


def _log(uri: str, shadow_version: str, prod_version: str | None, pairs: list[tuple[str, str]]):
    """Insert what the service logs: per request a production row and a shadow row."""
    now = dt.datetime.now(dt.UTC)
    with psycopg.connect(uri) as conn:
        for prod_pred, shadow_pred in pairs:
            request = uuid.uuid4()
            for is_shadow, version, pred in (
                (False, prod_version or "none", prod_pred),
                (True, shadow_version, shadow_pred),
            ):
                conn.execute(
                    "INSERT INTO inspection.predictions (prediction_id, request_id, image_id, "
                    "camera_id, model_version, is_shadow, prediction, predicted_class, "
                    "overall_confidence, inference_time_ms, predicted_at) "
                    "VALUES (%s, %s, %s, 'CAM1', %s, %s, %s, 'CRACK', 0.9, 12.0, %s)",
                    (uuid.uuid4(), request, uuid.uuid4(), version, is_shadow, pred, now),
                )


def _run(asset, resources, **inputs):
    context = dg.build_asset_context(resources=resources)
    return asset(context, **inputs)


def _bentos(home: Path) -> set[str]:
    return {p.name for p in (home / "bentoml" / "bentos" / "apex_visual_inspection").iterdir()}


def test_shadow_first_then_explicit_promotion(env) -> None:
    resources, uri, tmp = env
    mlflow, lake, db = resources["mlflow"], resources["lake"], resources["source_db"]

    # 1. First gated version: no production yet -> bento with v1 in shadow only.
    out = _run(deployed_bento, {}, mlflow=mlflow, lake=lake, onnx_model=_onnx_row("1"))
    row = out.value.row(0, named=True)
    assert row["shadow_version"] == "1" and row["production_version"] is None
    assert row["stage"] == "shadow" and row["bento_tag"].startswith("apex_visual_inspection:p0-s1-")
    assert row["bento_tag"].split(":")[1] in _bentos(tmp)
    target = mlflow.target()
    assert alias_version(target, SHADOW_ALIAS) == "1"
    assert alias_version(target, PRODUCTION_ALIAS) is None  # never moved by a deployment

    # 2. Too few shadow requests: the promotion is refused and nothing moves.
    _log(uri, "1", None, [("HUMAN_REVIEW", "FAIL")] * 2)
    comparison = _run(shadow_comparison, {}, source_db=db, deployed_bento=out.value)
    assert comparison.value["promotion_allowed"].to_list() == [False]
    config = {"version": "1", "approved_by": "qa.lead", "reason": "shadow week ok"}
    with pytest.raises(dg.Failure, match="refused"):
        _run(
            production_model,
            {},
            config=_cfg(config),
            mlflow=mlflow,
            source_db=db,
            deployed_bento=out.value,
        )
    assert alias_version(target, PRODUCTION_ALIAS) is None

    # A version that is not in shadow can never be promoted.
    with pytest.raises(dg.Failure, match="not the version in shadow"):
        _run(
            production_model,
            {},
            config=_cfg({**config, "version": "2"}),
            mlflow=mlflow,
            source_db=db,
            deployed_bento=out.value,
        )

    # 3. Enough requests (first deployment: no production partner, volume + latency only).
    _log(uri, "1", None, [("HUMAN_REVIEW", "FAIL")] * 3)
    promoted = _run(
        production_model,
        {},
        config=_cfg(config),
        mlflow=mlflow,
        source_db=db,
        deployed_bento=out.value,
    )
    prow = promoted.value.row(0, named=True)
    assert prow["model_version"] == "1" and prow["previous_version"] is None
    assert prow["approved_by"] == "qa.lead" and prow["forced"] is False
    assert alias_version(target, PRODUCTION_ALIAS) == "1"
    client = MlflowClient(tracking_uri=target.tracking_uri, registry_uri=target.tracking_uri)
    tags = client.get_model_version(NAME, "1").tags
    assert tags["deployment_stage"] == "production" and tags["promoted_by"] == "qa.lead"
    assert prow["bento_tag"].split(":")[1] in _bentos(tmp)

    # 4. The next gated version goes to shadow beside production v1.
    out2 = _run(deployed_bento, {}, mlflow=mlflow, lake=lake, onnx_model=_onnx_row("2"))
    row2 = out2.value.row(0, named=True)
    assert (row2["production_version"], row2["shadow_version"]) == ("1", "2")
    assert alias_version(target, PRODUCTION_ALIAS) == "1"

    # Paired comparison: 3 of 5 agree (0.6 < 0.75) -> refused; force promotes and records it.
    _log(uri, "2", "1", [("PASS", "PASS")] * 3 + [("PASS", "FAIL")] * 2)
    comparison2 = _run(shadow_comparison, {}, source_db=db, deployed_bento=out2.value)
    assert comparison2.value["paired"].to_list() == [5]
    assert comparison2.value["decision_agreement"].to_list() == [pytest.approx(0.6)]
    cfg2 = {"version": "2", "approved_by": "qa.lead", "reason": "urgent fix"}
    with pytest.raises(dg.Failure, match="agreement"):
        _run(
            production_model,
            {},
            config=_cfg(cfg2),
            mlflow=mlflow,
            source_db=db,
            deployed_bento=out2.value,
        )
    forced = _run(
        production_model,
        {},
        config=_cfg({**cfg2, "force": True}),
        mlflow=mlflow,
        source_db=db,
        deployed_bento=out2.value,
    )
    assert forced.value["forced"].to_list() == [True]
    assert forced.value["previous_version"].to_list() == ["1"]
    assert alias_version(target, PRODUCTION_ALIAS) == "2"
    assert client.get_model_version(NAME, "1").tags["deployment_stage"] == "retired"
    assert client.get_model_version(NAME, "2").tags["promotion_forced"] == "true"


def _cfg(values: dict):
    from apex_assets.defs.deployment.bento import PromotionConfig

    return PromotionConfig(**values)
