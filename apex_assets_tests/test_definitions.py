"""The Definitions load the way Dagster's own tools load them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from apex_assets.definitions import defs
from apex_assets.defs.evaluation.assets import deployment_gate

REPO = Path(__file__).resolve().parents[1]
INGESTION = {
    "image_metadata",
    "defect_annotations",
    "inspection_results",
    "camera_calibration",
    "equipment_registry",
    "production_orders",
    "inspection_overrides",
}


def test_assets_schedule_and_job():
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys >= INGESTION
    schedule = defs.resolve_schedule_def("cdc_ingestion_schedule")
    assert schedule.cron_schedule == "*/15 * * * *"
    assert schedule.job_name == "cdc_ingestion_job"
    graph = defs.resolve_asset_graph()
    partitioned = {
        k.to_user_string()
        for k in graph.get_all_asset_keys()
        if graph.get(k).partitions_def is not None
    }
    assert partitioned == {
        "image_metadata",
        "defect_annotations",
        "inspection_results",
        "inspection_overrides",
        "image_embeddings",
        "monitoring_metrics",
    }
    for key in INGESTION:
        assert graph.get(dg.AssetKey(key)).group_name == "ingestion"


def test_training_chain_is_gated_by_a_blocking_check():
    graph = defs.resolve_asset_graph()
    groups = {
        "image_embeddings": "features",
        "embedding_probe": "features",
        "trained_model": "training",
        "architecture_comparison": "training",
        "evaluation_report": "evaluation",
        "approved_model": "deployment",
    }
    for key, group in groups.items():
        assert graph.get(dg.AssetKey(key)).group_name == group
    assert dg.AssetKey("evaluation_report") in graph.get(dg.AssetKey("approved_model")).parent_keys
    assert dg.AssetKey("trained_model") in graph.get(dg.AssetKey("evaluation_report")).parent_keys
    (gate,) = deployment_gate.check_specs
    assert gate.blocking and gate.asset_key == dg.AssetKey("evaluation_report")
    job = defs.resolve_job_def("training_job")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {
        "trained_model",
        "evaluation_report",
        "approved_model",
        "onnx_model",
        "deployed_bento",
    }
    # ONNX parity blocks the bento exactly as the gate blocks approval.
    parity = next(c for c in defs.resolve_asset_graph().asset_check_keys if c.name == "onnx_parity")
    assert defs.resolve_asset_graph().get_check_spec(parity).blocking


def test_dg_check_defs_passes(tmp_path):
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path),
        "VIRTUAL_ENV": sys.prefix,
        "APEX_HOME": str(tmp_path / "apex"),
    }
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    dg_exe = Path(sys.executable).parent / "dg"
    proc = subprocess.run(
        [str(dg_exe), "check", "defs"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All definitions loaded successfully" in proc.stdout + proc.stderr
