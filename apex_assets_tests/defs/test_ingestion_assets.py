"""The ingestion assets and the CDC schedule, run by Dagster against a real PostgreSQL."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import psycopg
import pytest

from apex_assets.defs.automation.cdc import (
    RANGE_END_TAG,
    RANGE_START_TAG,
    cdc_ingestion_job,
    cdc_ingestion_schedule,
    delete_reconciliation_schedule,
)
from apex_assets.defs.ingestion.assets import PARTITIONED_KEYS, REFERENCE_KEYS, ingestion_assets
from apex_assets.defs.ingestion.cursors import latest_cursors
from apex_assets.defs.resources import LakeResource, SourceDatabaseResource
from apex_assets.lib import ingestion
from apex_assets.lib.lake_tables import read_table
from apex_assets_tests.builders import DAY0, insert_images, insert_reference_rows

NOW = dt.datetime.combine(DAY0 + dt.timedelta(days=10), dt.time(12), tzinfo=dt.UTC)


@pytest.fixture()
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def _defs(uri: str, lake_resource: LakeResource) -> dg.Definitions:
    return dg.Definitions(
        assets=ingestion_assets,
        jobs=[cdc_ingestion_job],
        schedules=[cdc_ingestion_schedule, delete_reconciliation_schedule],
        resources={
            "source_db": SourceDatabaseResource(url=uri, embedded_dir="/nonexistent"),
            "lake": lake_resource,
        },
    )


def _run_requests(instance, defs: dg.Definitions) -> list[dg.RunRequest]:
    schedule = defs.resolve_schedule_def("cdc_ingestion_schedule")
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=NOW,
        resources={"source_db": defs.resources["source_db"]},
    ) as context:
        result = schedule.evaluate_tick(context)
    return list(result.run_requests or [])


def _execute(instance, defs: dg.Definitions, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def("cdc_ingestion_job")
    return job.execute_in_process(
        instance=instance, tags=request.tags, asset_selection=request.asset_selection
    )


def run_cdc_until_quiet(instance, defs: dg.Definitions, max_ticks: int = 3) -> list[dg.RunRequest]:
    """Tick the schedule and execute what it asks for; return all requests made."""
    made: list[dg.RunRequest] = []
    for _ in range(max_ticks):
        requests = _run_requests(instance, defs)
        if not requests:
            return made
        for request in requests:
            assert _execute(instance, defs, request).success
        made.extend(requests)
    raise AssertionError("CDC schedule kept requesting runs")


def test_materialize_all_ingestion_assets(source_db_uri, tmp_path, instance):
    with psycopg.connect(source_db_uri) as conn:
        insert_images(conn, 9)
        insert_reference_rows(conn)
    lake_resource = LakeResource(local_dir=str(tmp_path / "lake"))
    resources = {
        "source_db": SourceDatabaseResource(url=source_db_uri, embedded_dir="/nonexistent"),
        "lake": lake_resource,
    }
    reference = [a for a in ingestion_assets if a.key in REFERENCE_KEYS]
    partitioned = [a for a in ingestion_assets if a.key in PARTITIONED_KEYS]
    assert dg.materialize(reference, instance=instance, resources=resources).success
    result = dg.materialize(
        partitioned,
        instance=instance,
        resources=resources,
        tags={RANGE_START_TAG: "2026-06-01", RANGE_END_TAG: "2026-06-03"},
    )
    assert result.success
    lake = lake_resource.get_lake()
    assert read_table(lake, ingestion.TABLES_BY_ASSET["image_metadata"].raw).height == 9
    assert read_table(lake, ingestion.TABLES_BY_ASSET["equipment_registry"].raw).height == 3

    # Metadata the catalog shows: row counts, column schema, preview, cursor.
    mat = instance.get_latest_materialization_event(dg.AssetKey("equipment_registry"))
    meta = mat.asset_materialization.metadata
    assert meta["dagster/row_count"].value == 3
    assert "machine_id" in [c.name for c in meta["dagster/column_schema"].schema.columns]
    assert "| machine_id |" in meta["preview"].value
    assert meta["cdc_cursor"].value
    cursors = latest_cursors(instance, dg.AssetKey("image_metadata"))
    assert sorted(k for k, v in cursors.items() if v) == ["2026-06-01", "2026-06-02", "2026-06-03"]


def test_cdc_schedule_requests_only_what_changed(source_db_uri, tmp_path, instance):
    with psycopg.connect(source_db_uri) as conn:
        ids = insert_images(conn, 9, hours_apart=7)  # DAY0 .. DAY0+2
        insert_reference_rows(conn)
    defs = _defs(source_db_uri, LakeResource(local_dir=str(tmp_path / "lake")))
    lake = defs.resources["lake"].get_lake()

    first = run_cdc_until_quiet(instance, defs)
    assert len(first) == 2  # one reference run + one range over the three days
    ranged = [r for r in first if RANGE_START_TAG in r.tags]
    assert (ranged[0].tags[RANGE_START_TAG], ranged[0].tags[RANGE_END_TAG]) == (
        "2026-06-01",
        "2026-06-03",
    )
    assert _run_requests(instance, defs) == []  # quiet: nothing changed

    # A late correction of a day-1 decision and a new capture on day 8.
    with psycopg.connect(source_db_uri) as conn:
        conn.execute(
            "UPDATE inspection.inspection_results SET decision = 'PASS' WHERE image_id = %s",
            (ids[0],),
        )
        conn.commit()
        insert_images(conn, 1, offset=24)  # 08:00 + 168 h = DAY0 + 7
    second = run_cdc_until_quiet(instance, defs)
    # days 1 and 8 changed; idle days between (<= 7) join one range rather than two runs
    assert [(r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]) for r in second] == [
        ("2026-06-01", "2026-06-08")
    ]
    results = read_table(lake, ingestion.TABLES_BY_ASSET["inspection_results"].raw)
    assert results.height == 10 and results["result_id"].n_unique() == 10
    changed = results.filter(results["image_id"] == ids[0])
    assert changed["decision"].to_list() == ["PASS"]

    # A reference table change triggers only the reference run.
    with psycopg.connect(source_db_uri) as conn:
        conn.execute(
            "UPDATE erp.production_orders SET status = 'closed' WHERE production_order_id = 'PO-0'"
        )
        conn.commit()
    third = _run_requests(instance, defs)
    assert len(third) == 1 and list(third[0].asset_selection) == [dg.AssetKey("production_orders")]


def test_ingestion_to_s3_over_real_http(source_db_uri, s3_endpoint, instance):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket="apex-lake"
    )
    with psycopg.connect(source_db_uri) as conn:
        insert_images(conn, 6)
        insert_reference_rows(conn)
    lake_resource = LakeResource(
        local_dir="/nonexistent",
        s3_bucket="apex-lake",
        s3_prefix="plant-a",
        s3_endpoint_url=s3_endpoint,
        s3_region="us-east-1",
    )
    defs = _defs(source_db_uri, lake_resource)
    run_cdc_until_quiet(instance, defs)
    lake = lake_resource.get_lake()
    assert read_table(lake, ingestion.TABLES_BY_ASSET["defect_annotations"].raw).height == 6
    keys = [
        o["Key"]
        for o in boto3.client(
            "s3", endpoint_url=s3_endpoint, region_name="us-east-1"
        ).list_objects_v2(Bucket="apex-lake")["Contents"]
    ]
    assert any(
        k.startswith("plant-a/raw/image_metadata/base/capture_date=2026-06-01") for k in keys
    )
    assert any(k.startswith("plant-a/raw/production_orders/base/all") for k in keys)


def test_nightly_reconciliation_schedule_tombstones_source_deletes(
    source_db_uri, tmp_path, instance
):
    with psycopg.connect(source_db_uri) as conn:
        ids = insert_images(conn, 6)
        insert_reference_rows(conn)
    defs = _defs(source_db_uri, LakeResource(local_dir=str(tmp_path / "lake")))
    run_cdc_until_quiet(instance, defs)
    with psycopg.connect(source_db_uri) as conn:
        conn.execute("DELETE FROM inspection.inspection_results WHERE image_id = %s", (ids[1],))
        conn.execute("DELETE FROM inspection.equipment_registry WHERE machine_id = 'm2'")
        conn.commit()
    schedule = defs.resolve_schedule_def("delete_reconciliation_schedule")
    with dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=NOW,
        resources={"source_db": defs.resources["source_db"], "lake": defs.resources["lake"]},
    ) as context:
        requests = list(schedule.evaluate_tick(context).run_requests or [])
    assert len(requests) == 2
    job = defs.resolve_job_def("cdc_ingestion_job")
    for request in requests:
        result = job.execute_in_process(
            instance=instance,
            tags=request.tags,
            asset_selection=request.asset_selection,
            run_config=request.run_config,
        )
        assert result.success
    lake = defs.resources["lake"].get_lake()
    results = read_table(lake, ingestion.TABLES_BY_ASSET["inspection_results"].raw)
    assert results.height == 5 and ids[1] not in results["image_id"].to_list()
    machines = read_table(lake, ingestion.TABLES_BY_ASSET["equipment_registry"].raw)
    assert sorted(machines["machine_id"]) == ["m0", "m1"]
    mat = instance.get_latest_materialization_event(dg.AssetKey("equipment_registry"))
    assert mat.asset_materialization.metadata["rows_deleted_at_source"].value == 1
