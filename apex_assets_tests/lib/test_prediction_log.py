"""The asynchronous prediction log against a real PostgreSQL: nothing lost, nothing doubled.

Why these tests: the serving path hands every prediction to this logger and answers the line
at once, so the logger alone guarantees that monitoring, shadow comparison and the inspectors'
queue see every prediction exactly once, across PostgreSQL outages, restarts and bad input.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from apex_assets.lib.prediction_log import (
    REJECTED_FILE,
    PredictionLogger,
    PredictionRecord,
    needs_review,
    review_id_for,
)

T0 = datetime(2025, 3, 14, 8, 0, tzinfo=UTC)
DECISIONS = ("PASS", "FAIL", "HUMAN_REVIEW")


def make_record(
    i: int,
    prediction: str = "PASS",
    *,
    is_shadow: bool = False,
    review_image_path: str | None = None,
    camera_id: str = "CAM-01",
    probabilities: dict[str, float] | None = None,
) -> PredictionRecord:
    """A deterministic record: ids from ``i`` so expected rows can be named in the test."""
    return PredictionRecord(
        prediction_id=uuid.UUID(int=1_000_000 + i),
        request_id=uuid.UUID(int=2_000_000 + i // 2),
        image_id=uuid.UUID(int=3_000_000 + i),
        camera_id=camera_id,
        model_version="shadow-2" if is_shadow else "prod-1",
        is_shadow=is_shadow,
        prediction=prediction,
        predicted_class="CRACK" if prediction != "PASS" else "NO_DEFECT",
        recommended_action={"PASS": "ACCEPT", "FAIL": "SCRAP", "HUMAN_REVIEW": "HOLD"}[prediction],
        defects=[
            {
                "class": "CRACK",
                "confidence": 0.625,
                "severity": "critical",
                "bounding_box": {"x": i, "y": 2, "width": 10, "height": 4},
                "area_percentage": 1.5,
            }
        ]
        if prediction != "PASS"
        else [],
        probabilities=probabilities
        if probabilities is not None
        else {"NO_DEFECT": 0.25, "CRACK": 0.75 - i / 10_000},
        overall_confidence=0.75 - i / 10_000,
        inference_time_ms=12.5,
        predicted_at=T0 + timedelta(seconds=i),
        review_image_path=review_image_path,
    )


def count(uri: str, table: str) -> int:
    with psycopg.connect(uri) as conn:
        return conn.execute(f"SELECT count(*) FROM inspection.{table}").fetchone()[0]


def spool_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("predictions-*"))


def fast_logger(uri: str, spool: Path, **kwargs) -> PredictionLogger:
    kwargs.setdefault("flush_interval_s", 0.02)
    return PredictionLogger(uri, spool, **kwargs)


# --------------------------------------------------------------------------------------------
# The record (no database)
# --------------------------------------------------------------------------------------------
def test_record_json_round_trip_and_validation():
    r = make_record(7, "HUMAN_REVIEW", review_image_path="/nas/review/7.png")
    text = r.to_json()
    assert "\n" not in text
    assert PredictionRecord.from_json(text) == r

    # Another zone is normalised to UTC, so the spool and the database agree.
    cet = timezone(timedelta(hours=1))
    r2 = make_record(1)
    shifted = PredictionRecord(
        **{**r2.__dict__, "predicted_at": datetime(2025, 3, 14, 9, 0, 1, tzinfo=cet)}
    )
    assert shifted.predicted_at == T0 + timedelta(seconds=1)
    assert shifted.predicted_at.tzinfo is UTC

    with pytest.raises(ValueError, match="timezone-aware"):
        PredictionRecord(**{**r2.__dict__, "predicted_at": datetime(2025, 1, 1)})
    with pytest.raises(ValueError, match="prediction must be"):
        PredictionRecord(**{**r2.__dict__, "prediction": "MAYBE"})
    bad = json.loads(text)
    bad["overall_confidence"] = "high"
    with pytest.raises(ValueError, match="overall_confidence"):
        PredictionRecord.from_json(json.dumps(bad))
    with pytest.raises(ValueError, match="missing fields: image_id"):
        PredictionRecord.from_json(
            json.dumps({k: v for k, v in json.loads(text).items() if k != "image_id"})
        )

    # Shadow records never reach the inspectors; production ones do when asked or given an image.
    assert needs_review(make_record(1, "HUMAN_REVIEW"))
    assert not needs_review(make_record(1, "HUMAN_REVIEW", is_shadow=True, review_image_path="/x"))
    assert needs_review(make_record(1, "FAIL", review_image_path="/x"))
    assert not needs_review(make_record(1, "FAIL"))
    assert review_id_for(r.prediction_id) == uuid.uuid5(
        uuid.UUID("b7c1f0e2-5a4d-4f3b-8e61-2d9a7c3e5f10"), str(r.prediction_id)
    )


# --------------------------------------------------------------------------------------------
# Against PostgreSQL
# --------------------------------------------------------------------------------------------
def test_300_records_land_exactly_with_review_rows_and_jsonb(source_db_uri, tmp_path):
    # i % 3 -> decision; every 4th record is the shadow model's; even HUMAN_REVIEW cases keep
    # an image. Production HUMAN_REVIEW: 100 with i % 3 == 2, minus the 25 with i % 12 == 8.
    records = [
        make_record(
            i,
            DECISIONS[i % 3],
            is_shadow=i % 4 == 0,
            review_image_path=f"/nas/review/{i}.png" if i % 6 == 2 else None,
        )
        for i in range(300)
    ]
    logger = fast_logger(source_db_uri, tmp_path / "spool", batch_size=64)
    logger.start()
    for r in records:
        logger.submit(r)
    assert logger.flush(10) is True
    stats = logger.stats()
    logger.close()

    assert count(source_db_uri, "predictions") == 300
    assert count(source_db_uri, "human_review_queue") == 75
    assert stats["submitted"] == 300 and stats["written"] == 300 and stats["review_rows"] == 75
    assert stats["spooled"] == stats["dropped"] == stats["queue_depth"] == 0

    with psycopg.connect(source_db_uri) as conn:
        row = conn.execute(
            "SELECT request_id, image_id, camera_id, model_version, is_shadow, prediction,"
            " predicted_class, recommended_action, defects, probabilities, overall_confidence,"
            " inference_time_ms, predicted_at FROM inspection.predictions WHERE prediction_id = %s",
            (records[5].prediction_id,),
        ).fetchone()
        review = conn.execute(
            "SELECT review_id, request_id, image_id, camera_id, model_version, predicted_class,"
            " overall_confidence, defects, probabilities, image_path, status"
            " FROM inspection.human_review_queue WHERE prediction_id = %s",
            (records[2].prediction_id,),
        ).fetchone()
        no_path = conn.execute(
            "SELECT image_path FROM inspection.human_review_queue WHERE prediction_id = %s",
            (records[5].prediction_id,),
        ).fetchone()
        shadow_reviews = conn.execute(
            "SELECT count(*) FROM inspection.human_review_queue q"
            " JOIN inspection.predictions p USING (prediction_id) WHERE p.is_shadow"
        ).fetchone()[0]

    r5 = records[5]  # 5 % 3 == 2: HUMAN_REVIEW, production, no image kept (5 % 6 != 2)
    assert row == (
        r5.request_id,
        r5.image_id,
        "CAM-01",
        "prod-1",
        False,
        "HUMAN_REVIEW",
        "CRACK",
        "HOLD",
        r5.defects,
        {"NO_DEFECT": 0.25, "CRACK": 0.7495},
        0.7495,
        12.5,
        T0 + timedelta(seconds=5),
    )
    assert row[8][0]["bounding_box"] == {"x": 5, "y": 2, "width": 10, "height": 4}
    r2 = records[2]
    assert review == (
        review_id_for(r2.prediction_id),
        r2.request_id,
        r2.image_id,
        "CAM-01",
        "prod-1",
        "CRACK",
        0.7498,
        r2.defects,
        r2.probabilities,
        "/nas/review/2.png",
        "OPEN",
    )
    assert no_path == (None,)  # HUMAN_REVIEW without a kept image still reaches the queue
    assert shadow_reviews == 0


def test_submit_is_fast_while_the_writer_writes(source_db_uri, tmp_path):
    logger = fast_logger(source_db_uri, tmp_path / "spool")
    logger.start()
    records = [make_record(i, DECISIONS[i % 3]) for i in range(1000)]
    t = time.perf_counter()
    for r in records:
        logger.submit(r)
    elapsed = time.perf_counter() - t
    assert logger.flush(15) is True
    logger.close()
    assert elapsed < 0.2, f"1,000 submits took {elapsed * 1000:.1f} ms"
    assert count(source_db_uri, "predictions") == 1000


def test_database_down_spools_then_replays_exactly_once(pg_server, source_db_uri, tmp_path):
    spool = tmp_path / "spool"
    records = [make_record(i, DECISIONS[i % 3]) for i in range(20)]  # 6 HUMAN_REVIEW (i%3==2)
    down = fast_logger(pg_server.get_uri("no_such_database"), spool, retry_interval_s=60)
    down.start()
    for r in records:
        down.submit(r)
    assert down.flush(10) is False
    down.close()
    stats = down.stats()
    assert stats["spooled"] == 20 and stats["written"] == 0 and stats["dropped"] == 0
    assert stats["write_errors"] >= 1
    [spool_file] = spool_files(spool)
    assert spool_file.name == f"predictions-{datetime.now(UTC):%Y-%m-%d}.jsonl"
    lines = spool_file.read_text().splitlines()
    assert [PredictionRecord.from_json(line) for line in lines] == records
    backup = tmp_path / "backup.jsonl"
    shutil.copy(spool_file, backup)

    up = fast_logger(source_db_uri, spool)
    up.start()
    assert up.flush(10) is True
    up.close()
    assert up.stats()["replayed"] == 20 and up.stats()["review_rows"] == 6
    assert count(source_db_uri, "predictions") == 20
    assert count(source_db_uri, "human_review_queue") == 6
    assert spool_files(spool) == []

    # A crash after the commit but before the delete: the same file replayed again adds nothing.
    shutil.copy(backup, spool_file)
    again = fast_logger(source_db_uri, spool)
    again.start()
    assert again.flush(10) is True
    again.close()
    assert again.stats()["replayed"] == 20
    assert count(source_db_uri, "predictions") == 20
    assert count(source_db_uri, "human_review_queue") == 6
    assert spool_files(spool) == []


def test_corrupt_spool_lines_are_rejected_and_valid_ones_replayed(
    pg_server, source_db_uri, tmp_path
):
    spool = tmp_path / "spool"
    spool.mkdir()
    good = [make_record(i, "FAIL") for i in range(3)]
    naive = json.loads(good[0].to_json()) | {"predicted_at": "2025-03-14T08:00:00"}
    old = spool / "predictions-2025-01-02.jsonl"
    old.write_text(
        f"{good[0].to_json()}\nnot json at all\n{json.dumps(naive)}\n\n{good[1].to_json()}\n"
    )
    # Today's file ends with a line cut short by a crash; the next append must not glue onto it.
    today = spool / f"predictions-{datetime.now(UTC):%Y-%m-%d}.jsonl"
    today.write_text(good[2].to_json() + "\n" + good[2].to_json()[:40])
    down = fast_logger(pg_server.get_uri("no_such_database"), spool, retry_interval_s=60)
    down.start()
    down.submit(make_record(3, "PASS"))
    down.close()
    assert down.stats()["spooled"] == 1

    up = fast_logger(source_db_uri, spool)
    up.start()
    assert up.flush(10) is True  # corrupt lines were never submitted here
    up.close()
    assert up.stats()["replayed"] == 4 and up.stats()["rejected"] == 3
    assert count(source_db_uri, "predictions") == 4
    assert spool_files(spool) == []
    rejected = [json.loads(line) for line in (spool / REJECTED_FILE).read_text().splitlines()]
    assert [
        (e["source"].split(".claimed-")[0], e["source"].rsplit(":", 1)[1]) for e in rejected
    ] == [
        ("predictions-2025-01-02.jsonl", "2"),
        ("predictions-2025-01-02.jsonl", "3"),
        (today.name, "2"),
    ]
    assert rejected[0]["line"] == "not json at all" and "not JSON" in rejected[0]["error"]
    assert "timezone-aware" in rejected[1]["error"]
    assert rejected[2]["line"] == good[2].to_json()[:40]


def test_rows_postgres_refuses_are_rejected_not_retried_forever(source_db_uri, tmp_path):
    spool = tmp_path / "spool"
    logger = fast_logger(source_db_uri, spool)
    logger.start()
    logger.submit(make_record(0, "FAIL"))
    logger.submit(make_record(1, "FAIL", camera_id="CAM\x00-01"))  # text cannot hold NUL
    nan = make_record(2, "HUMAN_REVIEW", probabilities={"NO_DEFECT": math.nan, "CRACK": 1.0})
    logger.submit(nan)
    assert logger.flush(10) is False  # one record is not in PostgreSQL
    assert logger.flush(10) is True  # and nothing new was lost since
    logger.close()
    assert logger.stats()["written"] == 2 and logger.stats()["rejected"] == 1
    assert spool_files(spool) == []
    [entry] = [json.loads(line) for line in (spool / REJECTED_FILE).read_text().splitlines()]
    assert entry["source"] == "queue" and "NUL" in entry["error"]
    assert PredictionRecord.from_json(entry["line"]) == make_record(
        1, "FAIL", camera_id="CAM\x00-01"
    )
    with psycopg.connect(source_db_uri) as conn:
        probs = conn.execute(
            "SELECT probabilities FROM inspection.predictions WHERE prediction_id = %s",
            (nan.prediction_id,),
        ).fetchone()[0]
    assert probs == {"NO_DEFECT": None, "CRACK": 1.0}  # jsonb has no NaN; the row is kept


def test_full_queue_spools_synchronously_and_start_replays(source_db_uri, tmp_path):
    spool = tmp_path / "spool"
    logger = fast_logger(source_db_uri, spool, max_queue=5)
    records = [make_record(i) for i in range(8)]
    t = time.perf_counter()
    for r in records:  # not started: the queue fills, then submit spools
        logger.submit(r)
    assert time.perf_counter() - t < 1.0
    assert logger.stats()["queue_depth"] == 5 and logger.stats()["spooled"] == 3
    assert len(spool_files(spool)[0].read_text().splitlines()) == 3
    logger.start()
    logger.start()  # idempotent: still one writer
    assert sum(t.name == "prediction-log-writer" for t in threading.enumerate()) == 1
    assert logger.flush(10) is True
    logger.close()
    stats = logger.stats()
    assert stats["written"] == 5 and stats["replayed"] == 3 and stats["dropped"] == 0
    assert count(source_db_uri, "predictions") == 8
    assert spool_files(spool) == []


def test_close_stops_the_thread_and_loses_nothing(source_db_uri, tmp_path):
    spool = tmp_path / "spool"
    logger = fast_logger(source_db_uri, spool, batch_size=50)
    logger.start()
    thread = logger._thread

    def producer(k: int) -> None:
        for i in range(k * 100, k * 100 + 100):
            logger.submit(make_record(i, DECISIONS[i % 3]))

    producers = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    logger.close(10)  # no flush first: close must write what is queued
    assert thread is not None and not thread.is_alive()
    assert count(source_db_uri, "predictions") == 400
    assert logger.stats()["written"] == 400

    logger.submit(make_record(999))  # after close: spooled, not lost
    assert logger.stats()["spooled"] == 1
    [late] = spool_files(spool)
    assert PredictionRecord.from_json(late.read_text().strip()) == make_record(999)
    logger.close()  # idempotent
