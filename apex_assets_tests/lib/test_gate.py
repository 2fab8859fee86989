"""Deployment gate: boundaries at the default thresholds (ARCHITECTURE §1), fail-closed rules.

Reports are built from hand-made confusion matrices (rows = true class, columns =
predicted, classes NO_DEFECT, SCRATCH, CRACK) through the real
``evaluate_predictions``; each test's comment works out the figures by hand.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from apex_assets.lib.gate import GateResult, GateThresholds, evaluate_gate, rejudge
from apex_assets.lib.metrics import EvaluationReport, evaluate_predictions

CLASSES = ("NO_DEFECT", "SCRATCH", "CRACK")
FAMILIES = {"CRACK": ["CRACK"]}
DEFAULTS = GateThresholds()


def report_from_confusion(matrix: list[list[int]], classes=CLASSES) -> EvaluationReport:
    """A report whose confusion matrix is ``matrix`` (each prediction made at 0.9)."""
    k = len(classes)
    y_true, y_pred = [], []
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            y_true += [i] * count
            y_pred += [j] * count
    probs = np.full((len(y_pred), k), 0.1 / (k - 1))
    probs[np.arange(len(y_pred)), y_pred] = 0.9
    report = evaluate_predictions(y_true, probs, classes)
    np.testing.assert_array_equal(report.confusion, matrix)
    return report


def statuses(result: GateResult) -> dict[str, str]:
    return {c.name: c.status for c in result.checks}


# Good report: every check passes, crack recall and FRR exactly at their thresholds.
#   ND  [19,  1,  0]  FRR 1/20 = 0.05 (<= 0.05 passes)
#   SCR [ 0, 20,  0]
#   CRK [ 0,  1, 99]  crack recall 99/100 = 0.99 (>= 0.99 passes)
# precision ND 19/19, SCR 20/22, CRK 99/99 -> macro 0.9697; recall (0.95 + 1 + 0.99)/3 = 0.98
GOOD = [[19, 1, 0], [0, 20, 0], [0, 1, 99]]


def test_good_report_passes_at_crack_and_frr_boundaries() -> None:
    result = evaluate_gate(report_from_confusion(GOOD), DEFAULTS, FAMILIES)
    assert result.passed
    assert result.failures == []
    assert result.reasons() == ""
    assert statuses(result) == {
        "overall_precision": "pass",
        "overall_recall": "pass",
        "recall[CRACK]": "pass",
        "false_reject_rate": "pass",
    }
    by_name = {c.name: c for c in result.checks}
    assert by_name["overall_precision"].value == pytest.approx((1 + 20 / 22 + 1) / 3)
    assert by_name["overall_recall"].value == pytest.approx(0.98)
    assert by_name["recall[CRACK]"].value == 0.99
    assert by_name["false_reject_rate"].value == 0.05
    assert [c.comparison for c in result.checks] == [">=", ">=", ">=", "<="]
    assert [c.threshold for c in result.checks] == [0.95, 0.93, 0.99, 0.05]


def test_crack_recall_just_below_fails_alone() -> None:
    # CRK [0, 1, 98]: 98/99 = 0.98990 < 0.99; everything else still passes.
    result = evaluate_gate(
        report_from_confusion([[19, 1, 0], [0, 20, 0], [0, 1, 98]]), DEFAULTS, FAMILIES
    )
    assert not result.passed
    assert [c.name for c in result.failures] == ["recall[CRACK]"]
    assert result.failures[0].value == pytest.approx(98 / 99)
    assert result.reasons() == "CRACK family recall 0.9899 < 0.99 (99 images; members CRACK)"


def test_false_reject_rate_just_above_fails_alone() -> None:
    # ND [18, 1, 0]: 1/19 = 0.0526 > 0.05.
    result = evaluate_gate(
        report_from_confusion([[18, 1, 0], [0, 20, 0], [0, 1, 99]]), DEFAULTS, FAMILIES
    )
    assert [c.name for c in result.failures] == ["false_reject_rate"]
    assert result.reasons() == "false-reject rate 0.053 > 0.05"


# Macro precision exactly 0.95:
#   ND  [38, 1,  1]  FRR 2/40 = 0.05
#   SCR [ 0, 9,  0]
#   CRK [ 0, 0, 19]
# precision ND 38/38 = 1, SCR 9/10 = 0.9, CRK 19/20 = 0.95 -> (1 + 0.9 + 0.95)/3 = 0.95, which
# floating point computes as 0.9499999999999998: the gate must still pass it.
def test_macro_precision_at_boundary_passes_just_below_fails() -> None:
    at = report_from_confusion([[38, 1, 1], [0, 9, 0], [0, 0, 19]])
    assert at.macro["precision"] == pytest.approx(0.95)
    result = evaluate_gate(at, DEFAULTS, FAMILIES)
    assert result.passed, result.reasons()
    # CRK [0, 0, 18]: CRK precision 18/19 -> macro (1 + 0.9 + 0.947368)/3 = 0.94912.
    below = evaluate_gate(
        report_from_confusion([[38, 1, 1], [0, 9, 0], [0, 0, 18]]), DEFAULTS, FAMILIES
    )
    assert [c.name for c in below.failures] == ["overall_precision"]
    assert below.reasons() == "macro precision 0.949 < 0.95"


# Macro recall exactly 0.93:
#   ND  [19,  0,    1]  recall 0.95, FRR 0.05
#   SCR [ 0, 84,   16]  recall 0.84
#   CRK [ 0,  0, 1000]  recall 1.0
# mean (0.95 + 0.84 + 1)/3 = 0.93; precision ND 1, SCR 1, CRK 1000/1017 -> macro 0.9944.
def test_macro_recall_at_boundary_passes_just_below_fails() -> None:
    at = report_from_confusion([[19, 0, 1], [0, 84, 16], [0, 0, 1000]])
    assert at.macro["recall"] == pytest.approx(0.93)
    assert evaluate_gate(at, DEFAULTS, FAMILIES).passed
    # SCR [0, 83, 17]: (0.95 + 0.83 + 1)/3 = 0.92667.
    below = evaluate_gate(
        report_from_confusion([[19, 0, 1], [0, 83, 17], [0, 0, 1000]]), DEFAULTS, FAMILIES
    )
    assert [c.name for c in below.failures] == ["overall_recall"]
    assert below.reasons() == "macro recall 0.927 < 0.93"


def test_reasons_names_every_failed_check() -> None:
    # ND [3, 1, 0], SCR [1, 2, 0], CRK [0, 1, 2]: macro P 0.75, R 25/36, crack 2/3, FRR 1/4.
    result = evaluate_gate(
        report_from_confusion([[3, 1, 0], [1, 2, 0], [0, 1, 2]]), DEFAULTS, FAMILIES
    )
    assert not result.passed
    assert len(result.failures) == 4
    assert result.reasons() == (
        "macro precision 0.750 < 0.95; macro recall 0.694 < 0.93; "
        "CRACK family recall 0.667 < 0.99 (3 images; members CRACK); "
        "false-reject rate 0.250 > 0.05"
    )


def test_critical_family_counts_any_member_as_caught() -> None:
    # NEU-like: CRACK is a parent of the model classes CRAZING and CRACK_LINE (no NO_DEFECT).
    # CRAZING [9, 1, 0], CRACK_LINE [1, 9, 0], PATCHES [0, 0, 10]: every crack is called a crack
    # kind, so the family recall is 20/20 = 1.0 although each member's own recall is 0.9.
    classes = ("CRAZING", "CRACK_LINE", "PATCHES")
    report = report_from_confusion([[9, 1, 0], [1, 9, 0], [0, 0, 10]], classes)
    thresholds = GateThresholds(min_precision=0.9, min_recall=0.9)
    result = evaluate_gate(report, thresholds, {"CRACK": ["CRAZING", "CRACK_LINE"]})
    check = {c.name: c for c in result.checks}["recall[CRACK]"]
    assert check.status == "pass"
    assert check.value == 1.0
    # No NO_DEFECT class: FRR does not apply, and does not block.
    assert statuses(result)["false_reject_rate"] == "not_applicable"
    assert result.passed


def test_critical_family_without_test_images_fails() -> None:
    # The ontology has CRACK but the test split holds none: recall cannot be shown -> fail.
    report = report_from_confusion([[20, 0, 0], [0, 20, 0], [0, 0, 0]])
    result = evaluate_gate(report, DEFAULTS, FAMILIES)
    assert not result.passed
    check = result.failures[0]
    assert (check.name, check.value, check.status) == ("recall[CRACK]", None, "fail")
    assert check.detail == "no CRACK images in the test set: recall cannot be shown"
    assert "no CRACK images in the test set" in result.reasons()


def test_critical_class_missing_from_ontology_is_not_applicable() -> None:
    report = report_from_confusion(GOOD)
    thresholds = GateThresholds(critical_recall={"CRACK": 0.99, "POROSITY": 0.99})
    result = evaluate_gate(report, thresholds, FAMILIES)
    check = {c.name: c for c in result.checks}["recall[POROSITY]"]
    assert (check.status, check.value) == ("not_applicable", None)
    assert check.detail == "no POROSITY class in this ontology"
    assert result.passed
    # Critical checks come in threshold order, between overall recall and FRR.
    assert [c.name for c in result.checks] == [
        "overall_precision",
        "overall_recall",
        "recall[CRACK]",
        "recall[POROSITY]",
        "false_reject_rate",
    ]


def test_family_member_unknown_to_the_model_fails() -> None:
    result = evaluate_gate(report_from_confusion(GOOD), DEFAULTS, {"CRACK": ["CRACK", "CRAZING"]})
    assert [c.name for c in result.failures] == ["recall[CRACK]"]
    assert "CRAZING" in result.reasons()


def test_no_good_parts_in_test_set_fails_frr() -> None:
    # NO_DEFECT is a model class but the test split has no good part: FRR cannot be shown.
    report = report_from_confusion([[0, 0, 0], [0, 20, 0], [0, 0, 100]])
    result = evaluate_gate(report, DEFAULTS, FAMILIES)
    assert [c.name for c in result.failures] == ["false_reject_rate"]
    assert result.reasons() == (
        "no good parts (NO_DEFECT) in the test set: false-reject rate cannot be shown"
    )


def test_nan_fails_closed() -> None:
    report = report_from_confusion(GOOD)
    broken = dataclasses.replace(report, macro={**report.macro, "precision": float("nan")})
    result = evaluate_gate(broken, DEFAULTS, FAMILIES)
    check = result.failures[0]
    assert (check.name, check.value, check.status) == ("overall_precision", None, "fail")
    assert check.detail == "macro precision is NaN"
    broken = dataclasses.replace(report, false_reject_rate=float("nan"))
    assert [c.name for c in evaluate_gate(broken, DEFAULTS, FAMILIES).failures] == [
        "false_reject_rate"
    ]
    missing = dataclasses.replace(report, macro={})
    assert {c.name for c in evaluate_gate(missing, DEFAULTS, FAMILIES).failures} == {
        "overall_precision",
        "overall_recall",
    }


def test_thresholds_are_validated_and_copied() -> None:
    for bad in (95.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="min_precision"):
            GateThresholds(min_precision=bad)
    with pytest.raises(ValueError, match=r"critical_recall\[CRACK\]"):
        GateThresholds(critical_recall={"CRACK": 99})
    mine = {"CRACK": 0.99}
    thresholds = GateThresholds(critical_recall=mine)
    mine["CRACK"] = 0.0
    assert thresholds.critical_recall == {"CRACK": 0.99}
    assert DEFAULTS.to_dict() == {
        "min_precision": 0.95,
        "min_recall": 0.93,
        "critical_recall": {"CRACK": 0.99},
        "max_false_reject_rate": 0.05,
    }


def test_to_dict_and_markdown() -> None:
    result = evaluate_gate(
        report_from_confusion([[18, 1, 0], [0, 20, 0], [0, 1, 99]]), DEFAULTS, FAMILIES
    )
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["passed"] is False
    assert data["reasons"] == "false-reject rate 0.053 > 0.05"
    assert [c["name"] for c in data["checks"]][-1] == "false_reject_rate"
    assert data["checks"][-1]["status"] == "fail"
    text = result.to_markdown()
    assert text.startswith("**Deployment gate: FAILED**: false-reject rate 0.053 > 0.05")
    assert "| check | value | threshold | status |" in text
    assert "| false_reject_rate | 0.0526 | <= 0.05 | FAIL |" in text
    assert "| recall[CRACK] | 0.9900 | >= 0.99 | pass |" in text
    passed = evaluate_gate(report_from_confusion(GOOD), DEFAULTS, FAMILIES).to_markdown()
    assert passed.startswith("**Deployment gate: PASSED**")


def test_rejudge_gives_the_same_verdict_as_evaluating_with_those_thresholds() -> None:
    """A model judged with a looser bar, then re-judged against the defaults from its stored
    checks alone, gets exactly what evaluate_gate with the defaults gives."""
    # ND [15, 5, 0] FRR 0.25; CRK [0, 10, 90] crack recall 0.90
    report = report_from_confusion([[15, 5, 0], [0, 20, 0], [0, 10, 90]])
    loose = GateThresholds(
        min_precision=0.8, min_recall=0.8, critical_recall={"CRACK": 0.9}, max_false_reject_rate=0.3
    )
    judged = evaluate_gate(report, loose, FAMILIES)
    assert judged.passed
    stored = json.loads(json.dumps(judged.to_dict()))["checks"]
    again = rejudge(stored, DEFAULTS)
    direct = evaluate_gate(report, DEFAULTS, FAMILIES)
    assert not again.passed
    assert again == direct
    assert {c.name for c in again.failures} == {
        "overall_precision",
        "overall_recall",
        "recall[CRACK]",
        "false_reject_rate",
    }
    assert rejudge(stored, loose) == judged  # round trip


def test_rejudge_fails_closed() -> None:
    report = report_from_confusion(GOOD)
    stored = evaluate_gate(report, DEFAULTS, FAMILIES).to_dict()["checks"]
    # a critical class the stored gate never measured fails; one not asked for is dropped
    more = dataclasses.replace(DEFAULTS, critical_recall={"CRACK": 0.99, "BURR": 0.9})
    result = rejudge(stored, more)
    assert statuses(result)["recall[BURR]"] == "fail" and not result.passed
    fewer = dataclasses.replace(DEFAULTS, critical_recall={})
    assert "recall[CRACK]" not in statuses(rejudge(stored, fewer))
    missing = [{**c, "value": None} if c["name"] == "overall_recall" else c for c in stored]
    assert statuses(rejudge(missing, DEFAULTS))["overall_recall"] == "fail"
    with pytest.raises(ValueError, match="unknown gate check"):
        rejudge([{"name": "accuracy", "value": 1.0, "status": "pass"}], DEFAULTS)
