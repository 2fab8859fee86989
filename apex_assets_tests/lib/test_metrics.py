"""Evaluation metrics (pure numpy/Polars): every expected value is worked out by hand.

The fixed prediction set used throughout (classes NO_DEFECT=0, SCRATCH=1, CRACK=2)::

    image   0    1    2    3    4    5    6    7    8    9
    true    ND   ND   ND   ND   SCR  SCR  SCR  CRK  CRK  CRK
    pred    ND   ND   ND   SCR  SCR  SCR  ND   CRK  CRK  SCR
    top-1  .95  .85  .72  .55  .99  .65  .45  1.0  .80  .50

Confusion (rows true, cols predicted)::

    ND   [3, 1, 0]   support 4
    SCR  [1, 2, 0]   support 3
    CRK  [0, 1, 2]   support 3
    predicted 4, 4, 2

* accuracy = (3 + 2 + 2) / 10 = 0.7
* ND:  P = 3/4, R = 3/4, F1 = 3/4
* SCR: P = 2/4, R = 2/3, F1 = 2 * 1/2 * 2/3 / (1/2 + 2/3) = 4/7
* CRK: P = 2/2, R = 2/3, F1 = 2 * 1 * 2/3 / (1 + 2/3) = 4/5
* macro P = (3/4 + 1/2 + 1) / 3 = 3/4; macro R = (3/4 + 2/3 + 2/3) / 3 = 25/36;
  macro F1 = (3/4 + 4/7 + 4/5) / 3 = 99/140
* weighted P = (4*3/4 + 3*1/2 + 3*1) / 10 = 3/4; weighted R = accuracy = 7/10;
  weighted F1 = (4*3/4 + 3*4/7 + 3*4/5) / 10 = 249/350
* FRR: 1 of 4 good parts called SCRATCH = 1/4; FAR: 1 of 6 defective parts called ND = 1/6
* histogram (correct, wrong): bin 4 [.4,.5) (0, 1) <- .45; bin 5 [.5,.6) (0, 2) <- .55, .50;
  bin 6 (1, 0) <- .65; bin 7 (1, 0) <- .72; bin 8 (2, 0) <- .85, .80; bin 9 (3, 0) <- .95, .99, 1.0
* mean confidence = 7.46 / 10 = 0.746
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from apex_assets.lib.metrics import (
    ClassMetrics,
    EvaluationReport,
    evaluate_predictions,
    family_recall,
)

CLASSES = ("NO_DEFECT", "SCRATCH", "CRACK")
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 1, 0, 2, 2, 1]
TOP = [0.95, 0.85, 0.72, 0.55, 0.99, 0.65, 0.45, 1.0, 0.80, 0.50]


def make_probs(pred: list[int], top: list[float], k: int) -> np.ndarray:
    """Rows whose arg-max is ``pred`` with probability ``top``, the rest shared evenly."""
    probs = np.empty((len(pred), k), dtype=np.float64)
    for i, (p, t) in enumerate(zip(pred, top, strict=True)):
        probs[i, :] = (1.0 - t) / (k - 1)
        probs[i, p] = t
    return probs


@pytest.fixture(scope="module")
def report() -> EvaluationReport:
    return evaluate_predictions(Y_TRUE, make_probs(Y_PRED, TOP, 3), CLASSES)


def test_headline_figures(report: EvaluationReport) -> None:
    assert report.classes == CLASSES
    assert report.n_images == 10
    assert report.accuracy == pytest.approx(0.7)
    assert report.no_defect_class == "NO_DEFECT"
    assert report.false_reject_rate == pytest.approx(1 / 4)
    assert report.false_accept_rate == pytest.approx(1 / 6)
    assert report.mean_confidence == pytest.approx(0.746)


def test_confusion_matrix(report: EvaluationReport) -> None:
    assert report.confusion.dtype == np.int64
    np.testing.assert_array_equal(report.confusion, [[3, 1, 0], [1, 2, 0], [0, 1, 2]])


def test_per_class_metrics(report: EvaluationReport) -> None:
    expected = {
        "NO_DEFECT": (3 / 4, 3 / 4, 3 / 4, 4, 4),
        "SCRATCH": (1 / 2, 2 / 3, 4 / 7, 3, 4),
        "CRACK": (1.0, 2 / 3, 4 / 5, 3, 2),
    }
    assert [m.class_id for m in report.per_class] == list(CLASSES)
    for m in report.per_class:
        p, r, f1, support, predicted = expected[m.class_id]
        assert (m.precision, m.recall, m.f1) == pytest.approx((p, r, f1)), m.class_id
        assert (m.support, m.predicted) == (support, predicted)


def test_macro_and_weighted_averages(report: EvaluationReport) -> None:
    assert report.macro == pytest.approx({"precision": 3 / 4, "recall": 25 / 36, "f1": 99 / 140})
    assert report.weighted == pytest.approx({"precision": 3 / 4, "recall": 7 / 10, "f1": 249 / 350})


def test_confidence_histogram(report: EvaluationReport) -> None:
    counts = {4: (0, 1), 5: (0, 2), 6: (1, 0), 7: (1, 0), 8: (2, 0), 9: (3, 0)}
    assert len(report.confidence_hist) == 10
    for b, (lo, hi, ok, bad) in enumerate(report.confidence_hist):
        assert (lo, hi) == pytest.approx((b / 10, (b + 1) / 10))
        assert (ok, bad) == counts.get(b, (0, 0)), f"bin {b}"
    assert sum(ok + bad for _, _, ok, bad in report.confidence_hist) == 10


def test_histogram_bin_edges_are_exact() -> None:
    # 0.3 and 0.7 sit exactly on edges and belong to the bin that starts there; 0.0 and 1.0
    # go to the first and last bins. Two classes, so a top-1 of 0.5 is a tie -> class 0.
    probs = np.array([[0.3, 0.7], [0.7, 0.3], [0.0, 1.0], [0.5, 0.5]])
    rep = evaluate_predictions([1, 1, 1, 0], probs, ["A", "B"])
    # predictions: 1 (ok, .7), 0 (wrong, .7), 1 (ok, 1.0), 0 (ok, tie .5)
    hist = {b: (ok, bad) for b, (_, _, ok, bad) in enumerate(rep.confidence_hist) if ok or bad}
    assert hist == {7: (1, 1), 9: (1, 0), 5: (1, 0)}
    np.testing.assert_array_equal(rep.confusion, [[1, 0], [1, 2]])


def test_macro_counts_only_classes_seen_or_predicted() -> None:
    # Classes A, B, C, D. C never occurs and is never predicted: left out of the macro.
    # D is predicted once but never occurs: P = R = F1 = 0, and it counts.
    # true  A A B B
    # pred  A D B B   -> A: P 1/1 R 1/2 F1 2/3; B: P 1 R 1 F1 1; D: 0, 0, 0
    probs = make_probs([0, 3, 1, 1], [0.9, 0.9, 0.9, 0.9], 4)
    rep = evaluate_predictions([0, 0, 1, 1], probs, ["A", "B", "C", "D"], no_defect_class=None)
    c = rep.per_class[2]
    assert (c.precision, c.recall, c.f1, c.support, c.predicted) == (0.0, 0.0, 0.0, 0, 0)
    d = rep.per_class[3]
    assert (d.precision, d.recall, d.f1, d.support, d.predicted) == (0.0, 0.0, 0.0, 0, 1)
    assert rep.macro == pytest.approx(
        {"precision": (1 + 1 + 0) / 3, "recall": (0.5 + 1 + 0) / 3, "f1": (2 / 3 + 1 + 0) / 3}
    )
    # weighted: (2 * A + 2 * B) / 4
    assert rep.weighted == pytest.approx(
        {"precision": 1.0, "recall": 0.75, "f1": (2 * 2 / 3 + 2 * 1) / 4}
    )


def test_agrees_with_scikit_learn(report: EvaluationReport) -> None:
    """Cross-check against the reference implementation when it happens to be installed."""
    skm = pytest.importorskip("sklearn.metrics")
    for average in ("macro", "weighted"):
        p, r, f1, _ = skm.precision_recall_fscore_support(
            Y_TRUE, Y_PRED, average=average, zero_division=0
        )
        assert getattr(report, average) == pytest.approx({"precision": p, "recall": r, "f1": f1})
    np.testing.assert_array_equal(report.confusion, skm.confusion_matrix(Y_TRUE, Y_PRED))


def test_neu_like_ontology_without_no_defect() -> None:
    # NEU steel: every image is a defect; FRR and FAR do not exist.
    classes = ["CRAZING", "INCLUSION", "PATCHES"]
    rep = evaluate_predictions([0, 1, 2, 2], make_probs([0, 1, 2, 1], [0.9] * 4, 3), classes)
    assert rep.no_defect_class is None
    assert rep.false_reject_rate is None
    assert rep.false_accept_rate is None
    assert rep.accuracy == pytest.approx(0.75)
    assert "n/a (no NO_DEFECT class)" in rep.to_markdown()


def test_no_defect_class_present_but_one_side_missing() -> None:
    # No good part in the test set: FRR unmeasurable (None), FAR = 1 of 3 defective called ND.
    rep = evaluate_predictions([1, 1, 2], make_probs([1, 0, 2], [0.9] * 3, 3), CLASSES)
    assert rep.no_defect_class == "NO_DEFECT"
    assert rep.false_reject_rate is None
    assert rep.false_accept_rate == pytest.approx(1 / 3)
    assert "FRR** n/a (no good parts in the test set)" in rep.to_markdown()
    # Only good parts: FAR unmeasurable, FRR = 1 of 2 good parts called CRACK.
    rep = evaluate_predictions([0, 0], make_probs([0, 2], [0.9] * 2, 3), CLASSES)
    assert rep.false_reject_rate == pytest.approx(1 / 2)
    assert rep.false_accept_rate is None


def test_no_defect_class_name_is_configurable() -> None:
    probs = make_probs([0, 1, 1], [0.9] * 3, 2)
    assert (
        evaluate_predictions([0, 0, 1], probs, ["OK", "NG"], no_defect_class=None).false_reject_rate
        is None
    )
    rep = evaluate_predictions([0, 0, 1], probs, ["OK", "NG"], no_defect_class="OK")
    assert rep.no_defect_class == "OK"
    assert rep.false_reject_rate == pytest.approx(1 / 2)
    assert rep.false_accept_rate == pytest.approx(0.0)


def test_family_recall(report: EvaluationReport) -> None:
    # CRACK alone: 2 of 3 cracks predicted CRACK.
    assert family_recall(report, ["CRACK"]) == (pytest.approx(2 / 3), 3)
    # {SCRATCH, CRACK}: true in family 6; predicted in family: SCR->SCR 2, CRK->SCR 1, CRK->CRK 2.
    assert family_recall(report, ["SCRATCH", "CRACK"]) == (pytest.approx(5 / 6), 6)
    # Repeating a member does not double-count it.
    assert family_recall(report, ["CRACK", "CRACK"]) == (pytest.approx(2 / 3), 3)
    assert family_recall(report, []) == (None, 0)


def test_family_recall_zero_support_and_unknown_member() -> None:
    rep = evaluate_predictions([0, 1], make_probs([0, 2], [0.9, 0.9], 3), CLASSES)
    assert family_recall(rep, ["CRACK"]) == (None, 0)
    with pytest.raises(ValueError, match="CRAZING"):
        family_recall(rep, ["CRACK", "CRAZING"])


@pytest.mark.parametrize(
    ("y_true", "probs", "classes", "message"),
    [
        ([], np.zeros((0, 2)), ["A", "B"], "empty"),
        ([0, 1], np.full((2, 3), 1 / 3), ["A", "B"], "3 column"),
        ([0, 1, 1], np.full((2, 2), 0.5), ["A", "B"], "2 row"),
        ([0, 2], np.full((2, 2), 0.5), ["A", "B"], "outside 0..1"),
        ([0, -1], np.full((2, 2), 0.5), ["A", "B"], "outside 0..1"),
        ([0, 1], np.array([[0.5, 0.5], [np.nan, 0.5]]), ["A", "B"], "NaN"),
        ([0, 1], np.array([[0.5, 0.5], [np.inf, 0.5]]), ["A", "B"], "NaN/inf"),
        ([0, 1], np.array([[2.3, -1.1], [0.2, 0.4]]), ["A", "B"], "logits"),
        ([0, 1], np.full(2, 0.5), ["A", "B"], "2-D"),
        ([[0], [1]], np.full((2, 2), 0.5), ["A", "B"], "1-D"),
        ([0.0, 1.0], np.full((2, 2), 0.5), ["A", "B"], "integer"),
        ([0, 1], np.full((2, 2), 0.5), ["A", "A"], "unique"),
        ([0, 1], np.full((2, 0), 0.5), [], "classes is empty"),
    ],
)
def test_invalid_input_raises(y_true, probs, classes, message) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(y_true, probs, classes)


def test_float32_rounding_above_one_is_accepted() -> None:
    # A float32 softmax can give 1.0000001; it is clipped, not rejected.
    probs = np.array([[1.0000001, 0.0], [0.0, 1.0]], dtype=np.float32)
    rep = evaluate_predictions(np.array([0, 1], dtype=np.int32), probs, ["A", "B"])
    assert rep.accuracy == 1.0
    assert rep.mean_confidence == 1.0
    assert rep.confidence_hist[9][2:] == (2, 0)


def test_json_round_trip(report: EvaluationReport) -> None:
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)
    back = EvaluationReport.from_dict(json.loads(text))
    assert back == report
    assert back.confusion.dtype == np.int64
    assert isinstance(back.per_class[0], ClassMetrics)
    assert back.to_dict() == data
    # None survives too (NEU-like report).
    neu = evaluate_predictions([0, 1], make_probs([0, 1], [0.9, 0.6], 2), ["X", "Y"])
    assert EvaluationReport.from_dict(json.loads(json.dumps(neu.to_dict()))) == neu


def test_equality_sees_the_confusion_matrix(report: EvaluationReport) -> None:
    data = report.to_dict()
    data["confusion"][0][0] = 99
    assert EvaluationReport.from_dict(data) != report
    with pytest.raises(ValueError, match="lacks key"):
        EvaluationReport.from_dict({"classes": ["A"]})


def test_frames(report: EvaluationReport) -> None:
    per_class = report.per_class_frame()
    assert per_class.columns == ["class", "precision", "recall", "f1", "support", "predicted"]
    assert per_class.schema["support"] == pl.Int64
    assert per_class.row(1) == pytest.approx(("SCRATCH", 0.5, 2 / 3, 4 / 7, 3, 4))
    confusion = report.confusion_frame()
    assert confusion.columns == ["true_class", "NO_DEFECT", "SCRATCH", "CRACK"]
    assert all(confusion.schema[c] == pl.Int64 for c in CLASSES)
    assert confusion.rows() == [
        ("NO_DEFECT", 3, 1, 0),
        ("SCRATCH", 1, 2, 0),
        ("CRACK", 0, 1, 2),
    ]


def test_markdown(report: EvaluationReport) -> None:
    text = report.to_markdown()
    assert "**Accuracy** 0.700 on 10 test images" in text
    assert "precision 0.750, recall 0.694, F1 0.707" in text  # 25/36 = 0.694, 99/140 = 0.707
    assert "**FRR** 0.250" in text and "**FAR** 0.167" in text
    assert "| SCRATCH | 0.5 | 0.667 | 0.571 | 3 | 4 |" in text
    assert "| CRACK | 0 | 1 | 2 |" in text


def test_flat_metrics_for_the_tracker() -> None:
    from apex_assets.lib.metrics import flat_metrics

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    report = evaluate_predictions([0, 1, 1, 1], probs, ["NO_DEFECT", "CRACK"])
    flat = flat_metrics(report)
    assert flat["test_accuracy"] == 0.75
    assert flat["test_recall_CRACK"] == pytest.approx(2 / 3)
    assert flat["test_false_reject_rate"] == 0.0  # the one good part passed
    assert flat["test_false_accept_rate"] == pytest.approx(1 / 3)
    nd = flat_metrics(evaluate_predictions([0, 1], np.eye(2), ["A", "B"], None), prefix="val_")
    assert "val_false_reject_rate" not in nd and nd["val_accuracy"] == 1.0
