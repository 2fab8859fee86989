"""The Definitions load the way Dagster's own tools load them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from apex_assets.definitions import defs

REPO = Path(__file__).resolve().parents[1]
INGESTION = {
    "image_metadata",
    "defect_annotations",
    "inspection_results",
    "camera_calibration",
    "equipment_registry",
    "production_orders",
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
    assert partitioned == {"image_metadata", "defect_annotations", "inspection_results"}
    for key in INGESTION:
        assert graph.get(dg.AssetKey(key)).group_name == "ingestion"


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
