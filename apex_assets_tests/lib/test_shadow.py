"""Tests of the shadow comparison report and promotion policy (hand-computed expectations)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import polars as pl
import psycopg
import pytest

from apex_assets.lib.shadow import (
    NO_MODEL_VERSION,
    PAIR_SCHEMA,
    PromotionPolicy,
    ShadowReport,
    promotion_decision,
    read_shadow_pairs,
    shadow_plot,
    shadow_report,
)

T0 = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)


def _pairs(rows: list[tuple]) -> pl.DataFrame:
    """Frame in read_shadow_pairs' layout from (request, prod_version, prod_prediction,
    prod_class, prod_ms, shadow_prediction, shadow_class, shadow_ms) tuples."""
    full = [
        (req, "cam-1", T0 + dt.timedelta(minutes=i), pv, pp, pc, 0.9, pm, sp, sc, 0.85, sm)
        for i, (req, pv, pp, pc, pm, sp, sc, sm) in enumerate(rows)
    ]
    return pl.DataFrame(full, schema=PAIR_SCHEMA, orient="row")


# r1, r2 agree fully; r3 agrees on the decision only; r4 disagrees on both; r5 has no partner.
HAND = [
    ("r1", "v1", "PASS", "NO_DEFECT", 10.0, "PASS", "NO_DEFECT", 20.0),
    ("r2", "v1", "FAIL", "CRACK", 30.0, "FAIL", "CRACK", 40.0),
    ("r3", "v1", "FAIL", "BURR", 50.0, "FAIL", "CRACK", 60.0),
    ("r4", "v1", "HUMAN_REVIEW", "BURR", 70.0, "PASS", "NO_DEFECT", 80.0),
    ("r5", None, None, None, None, "HUMAN_REVIEW", "CRACK", 100.0),
]


@pytest.fixture()
def hand_report() -> ShadowReport:
    return shadow_report(_pairs(HAND), "v2")


def test_report_counts_and_agreement(hand_report: ShadowReport) -> None:
    r = hand_report
    assert (r.shadow_version, r.production_versions) == ("v2", ("v1",))
    assert (r.requests, r.paired) == (5, 4)
    assert r.decision_agreement == pytest.approx(3 / 4)
    assert r.class_agreement == pytest.approx(2 / 4)
    assert r.shadow_review_rate == pytest.approx(1 / 5)  # r5, over all shadow rows
    assert r.prod_review_rate == pytest.approx(1 / 4)  # r4, over the pairs
    assert not r.first_deployment


def test_report_per_class_and_matrix(hand_report: ShadowReport) -> None:
    assert hand_report.per_class.rows() == [
        # class, prod_count, shadow_count, agree, prod_only, shadow_only (pairs only)
        ("BURR", 2, 0, 0, 2, 0),
        ("CRACK", 1, 2, 1, 0, 1),
        ("NO_DEFECT", 1, 2, 1, 0, 1),
    ]
    assert hand_report.decision_matrix.columns == ["prod", "shadow", "n"]
    assert hand_report.decision_matrix.rows() == [
        ("FAIL", "FAIL", 2),
        ("HUMAN_REVIEW", "PASS", 1),
        ("PASS", "PASS", 1),
    ]


def test_report_latency_percentiles(hand_report: ShadowReport) -> None:
    # production over the 4 pairs [10, 30, 50, 70]: p95 at position 2.85 -> 50 + 0.85 * 20
    assert hand_report.prod_latency_ms == pytest.approx(
        {"p50": 40.0, "p95": 67.0, "p99": 69.4, "mean": 40.0}
    )
    # shadow over all 5 rows [20..100]: p95 at position 3.8 -> 80 + 0.8 * 20
    assert hand_report.shadow_latency_ms == pytest.approx(
        {"p50": 60.0, "p95": 96.0, "p99": 99.2, "mean": 60.0}
    )


def test_report_null_values_never_agree() -> None:
    rows = [
        ("a", "v1", None, None, 5.0, "PASS", "NO_DEFECT", 5.0),
        ("b", "v1", "PASS", "NO_DEFECT", float("nan"), "PASS", "NO_DEFECT", 7.0),
    ]
    r = shadow_report(_pairs(rows), "v2")
    assert r.decision_agreement == pytest.approx(0.5)
    assert r.class_agreement == pytest.approx(0.5)
    assert r.prod_latency_ms["mean"] == pytest.approx(5.0)  # the NaN time is left out
    assert r.per_class.rows() == [("NO_DEFECT", 1, 2, 1, 0, 1)]


def test_report_without_production_is_first_deployment() -> None:
    rows = [("a", None, None, None, None, "PASS", "NO_DEFECT", 9.0)]
    r = shadow_report(_pairs(rows), "v2")
    assert (r.requests, r.paired, r.first_deployment) == (1, 0, True)
    assert r.decision_agreement is None and r.class_agreement is None
    assert r.prod_review_rate is None and r.prod_latency_ms == {}
    assert r.shadow_latency_ms["p99"] == pytest.approx(9.0)
    assert r.per_class.height == 0 and r.decision_matrix.height == 0
    assert r.production_versions == ()
    assert "first deployment" in r.to_markdown()
    assert "decision_agreement" not in r.to_metadata()


def test_report_rejects_a_frame_without_the_columns() -> None:
    with pytest.raises(ValueError, match="shadow_ms"):
        shadow_report(_pairs(HAND).drop("shadow_ms"), "v2")


def test_metadata_and_markdown(hand_report: ShadowReport) -> None:
    meta = hand_report.to_metadata()
    assert meta["shadow_version"] == "v2" and meta["production_versions"] == "v1"
    assert (meta["requests"], meta["paired"], meta["unpaired"]) == (5, 4, 1)
    assert meta["decision_agreement"] == pytest.approx(0.75)
    assert meta["shadow_latency_p95_ms"] == pytest.approx(96.0)
    assert meta["prod_latency_p99_ms"] == pytest.approx(69.4)
    assert all(isinstance(v, int | float | str) for v in meta.values())
    md = hand_report.to_markdown()
    assert "75.00%" in md and "| HUMAN_REVIEW | PASS | 1 |" in md
    assert "| BURR | 2 | 0 | 0 | 2 | 0 |" in md


# -- promotion policy ------------------------------------------------------------------------


def _report(**changes) -> ShadowReport:
    base = shadow_report(_pairs(HAND), "v2")
    defaults = {
        "requests": 600,
        "paired": 600,
        "decision_agreement": 0.97,
        "shadow_latency_ms": {"p50": 20.0, "p95": 60.0, "p99": 150.0, "mean": 25.0},
    }
    return dataclasses.replace(base, **{**defaults, **changes})


POLICY = PromotionPolicy()


def test_promotion_allowed_including_exact_bounds() -> None:
    assert promotion_decision(_report(), POLICY).allowed
    exact = _report(
        requests=500, decision_agreement=0.95, shadow_latency_ms={"p99": 200.0, "p50": 1.0}
    )
    decision = promotion_decision(exact, POLICY)
    assert decision.allowed and decision.reasons == ()


def test_promotion_blocks_too_few_requests() -> None:
    decision = promotion_decision(_report(requests=499, paired=499), POLICY)
    assert not decision.allowed
    assert decision.reasons == ("only 499 shadow requests, at least 500 needed",)


def test_promotion_blocks_low_agreement() -> None:
    decision = promotion_decision(_report(decision_agreement=0.94), POLICY)
    assert not decision.allowed
    assert decision.reasons == (
        "decision agreement 94.00% over 600 pairs is below the 95.00% minimum",
    )


def test_promotion_blocks_slow_p99() -> None:
    decision = promotion_decision(_report(shadow_latency_ms={"p99": 250.5}), POLICY)
    assert not decision.allowed
    assert decision.reasons == ("shadow p99 latency 250.5 ms is above the 200 ms limit",)


def test_promotion_first_deployment_needs_no_agreement() -> None:
    first = _report(paired=0, decision_agreement=None)
    assert promotion_decision(first, POLICY).allowed
    few = promotion_decision(_report(requests=10, paired=0, decision_agreement=None), POLICY)
    assert not few.allowed and len(few.reasons) == 1


def test_promotion_nan_never_passes() -> None:
    nan = float("nan")
    for report in (
        _report(decision_agreement=nan),
        _report(shadow_latency_ms={"p99": nan}),
        _report(shadow_latency_ms={}),
    ):
        decision = promotion_decision(report, POLICY)
        assert not decision.allowed and len(decision.reasons) == 1
    assert not promotion_decision(_report(), PromotionPolicy(min_agreement=nan)).allowed
    assert not promotion_decision(_report(), PromotionPolicy(max_latency_p99_ms=nan)).allowed


def test_promotion_lists_every_failed_rule() -> None:
    bad = _report(requests=3, paired=3, decision_agreement=0.5, shadow_latency_ms={"p99": 900})
    assert len(promotion_decision(bad, POLICY).reasons) == 3


# -- real PostgreSQL -------------------------------------------------------------------------

_INSERT = """
INSERT INTO inspection.predictions (prediction_id, request_id, camera_id, model_version,
    is_shadow, prediction, predicted_class, overall_confidence, inference_time_ms, predicted_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


def test_read_shadow_pairs_from_postgres(source_db_uri: str) -> None:
    req = {k: uuid.uuid4() for k in "ABCD"}
    hour = dt.timedelta(hours=1)
    rows = [
        # request, version, shadow?, prediction, class, ms, time
        ("A", "v1", False, "PASS", "NO_DEFECT", 12.0, T0),
        ("A", "v2", True, "PASS", "NO_DEFECT", 8.0, T0),
        ("A", "v3", True, "FAIL", "CRACK", 9.0, T0),  # another candidate: not in v2's report
        ("B", "v1", False, "FAIL", "CRACK", 15.0, T0 + hour),
        ("B", "v2", True, "HUMAN_REVIEW", "CRACK", 9.0, T0 + hour),
        ("C", "v2", True, "PASS", "NO_DEFECT", 7.0, T0 + 2 * hour),  # shadow only
        # no model in production yet: the placeholder row is not a partner
        ("D", NO_MODEL_VERSION, False, "HUMAN_REVIEW", "", 3.0, T0 + 3 * hour),
        ("D", "v2", True, "FAIL", "BURR", 6.0, T0 + 3 * hour),
    ]
    with psycopg.connect(source_db_uri) as conn:
        conn.cursor().executemany(
            _INSERT,
            [
                (uuid.uuid4(), req[r], "cam-1", v, s, p, c, 0.9, ms, t)
                for r, v, s, p, c, ms, t in rows
            ],
        )

    pairs = read_shadow_pairs(source_db_uri, shadow_version="v2")
    assert pairs.schema == pl.Schema(PAIR_SCHEMA)
    assert pairs["request_id"].to_list() == [str(req[k]) for k in "ABCD"]
    assert pairs["prod_version"].to_list() == ["v1", "v1", None, None]
    assert pairs["prod_prediction"].to_list() == ["PASS", "FAIL", None, None]
    assert pairs["shadow_class"].to_list() == ["NO_DEFECT", "CRACK", "NO_DEFECT", "BURR"]
    assert pairs["prod_ms"].to_list() == [12.0, 15.0, None, None]
    assert pairs["shadow_ms"].to_list() == [8.0, 9.0, 7.0, 6.0]
    assert pairs["predicted_at"][0] == T0

    report = shadow_report(pairs, "v2")
    assert (report.requests, report.paired, report.decision_agreement) == (4, 2, 0.5)

    other = read_shadow_pairs(source_db_uri, shadow_version="v3")
    assert other.select("prod_version", "shadow_prediction").rows() == [("v1", "FAIL")]

    # [since, until): B only; C sits exactly on `until` and is left out
    window = read_shadow_pairs(
        source_db_uri, shadow_version="v2", since=T0 + hour / 2, until=T0 + 2 * hour
    )
    assert window["request_id"].to_list() == [str(req["B"])]
    assert read_shadow_pairs(source_db_uri, shadow_version="v2", since=T0 + 2 * hour).height == 2
    assert read_shadow_pairs(source_db_uri, shadow_version="missing").height == 0

    with pytest.raises(ValueError, match="timezone-aware"):
        read_shadow_pairs(source_db_uri, shadow_version="v2", since=dt.datetime(2025, 1, 1))


# -- plot ------------------------------------------------------------------------------------


def test_shadow_plot_writes_png(hand_report: ShadowReport, tmp_path) -> None:
    out = shadow_plot(hand_report, tmp_path / "plots" / "shadow.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024

    empty = shadow_report(pl.DataFrame(schema=PAIR_SCHEMA), "v2")
    assert empty.requests == 0 and empty.shadow_latency_ms == {}
    empty_png = shadow_plot(empty, tmp_path / "empty.png").read_bytes()
    assert empty_png[:8] == b"\x89PNG\r\n\x1a\n" and len(empty_png) > 1024
