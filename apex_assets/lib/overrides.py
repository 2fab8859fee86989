"""What an inspector override means: one vocabulary for monitoring, reports and the sensor.

``inspection.inspection_overrides`` holds what the model said (``model_prediction``) and what
the inspector decided (``inspector_decision``). The line writes two kinds of values there:

* decisions, ``PASS`` / ``FAIL`` (and ``REWORK`` / ``SCRAP`` from some stations): the inspector
  overturned the model's accept/reject;
* defect classes (``SURFACE_SCRATCH`` -> ``SURFACE_PIT``): the part is defective either way but
  the model named the wrong defect.

Every consumer (FRR/FAR in monitoring, the weekly override report, the retraining sensor's
critical-miss count, the impact summary) must read them the same way, so the mapping lives here.
A value is a *good-part verdict* when it is ``PASS`` or the ontology's no-defect class; any
other non-empty value (a reject decision or a defect class) is a *defective-part verdict*.
"""

from __future__ import annotations

from typing import Literal

import polars as pl

__all__ = [
    "CLASS_CONFUSION",
    "CRITICAL_MISS",
    "FALSE_REJECT",
    "OTHER",
    "inspector_override",
    "kind_expr",
    "override_kind",
    "verdict",
    "verdict_expr",
]

Verdict = Literal["PASS", "FAIL"]

#: model FAIL, inspector PASS: a good part the model would have rejected.
FALSE_REJECT = "false_reject"
#: model PASS, inspector FAIL: a defective part the model would have shipped (safety-critical).
CRITICAL_MISS = "critical_miss"
#: both say defective, but not the same defect class.
CLASS_CONFUSION = "class_confusion"
#: anything else (e.g. a HUMAN_REVIEW the inspector resolved, or an unreadable value).
OTHER = "other"

_GOOD = frozenset({"PASS", "NO_DEFECT", "OK", "GOOD"})
_EMPTY = frozenset({"", "HUMAN_REVIEW"})


def _norm(value: str | None) -> str:
    return (value or "").strip().upper()


def verdict(value: str | None) -> Verdict | None:
    """``PASS`` for a good-part value, ``FAIL`` for a reject or a defect class, None if empty.

    ``HUMAN_REVIEW`` is not a verdict: the model left the decision to a person.
    """
    v = _norm(value)
    if v in _EMPTY:
        return None
    return "PASS" if v in _GOOD else "FAIL"


def override_kind(model_prediction: str | None, inspector_decision: str | None) -> str:
    """Which pattern an override is: false reject, critical miss, class confusion or other."""
    model, inspector = verdict(model_prediction), verdict(inspector_decision)
    if model == "FAIL" and inspector == "PASS":
        return FALSE_REJECT
    if model == "PASS" and inspector == "FAIL":
        return CRITICAL_MISS
    if (
        model == "FAIL"
        and inspector == "FAIL"
        and _norm(model_prediction) != _norm(inspector_decision)
        and _norm(model_prediction) not in ("FAIL", "REWORK", "SCRAP")
        and _norm(inspector_decision) not in ("FAIL", "REWORK", "SCRAP")
    ):
        return CLASS_CONFUSION
    return OTHER


def verdict_expr(column: str) -> pl.Expr:
    """:func:`verdict` as a Polars expression (vectorised, for a million rows)."""
    v = pl.col(column).fill_null("").str.strip_chars().str.to_uppercase()
    return (
        pl.when(v.is_in(list(_EMPTY)))
        .then(pl.lit(None, dtype=pl.String))
        .when(v.is_in(list(_GOOD)))
        .then(pl.lit("PASS"))
        .otherwise(pl.lit("FAIL"))
    )


def kind_expr(
    model_col: str = "model_prediction", inspector_col: str = "inspector_decision"
) -> pl.Expr:
    """:func:`override_kind` as a Polars expression."""
    model, inspector = verdict_expr(model_col), verdict_expr(inspector_col)
    m = pl.col(model_col).fill_null("").str.strip_chars().str.to_uppercase()
    i = pl.col(inspector_col).fill_null("").str.strip_chars().str.to_uppercase()
    decisions = ["FAIL", "REWORK", "SCRAP"]
    return (
        pl.when((model == "FAIL") & (inspector == "PASS"))
        .then(pl.lit(FALSE_REJECT))
        .when((model == "PASS") & (inspector == "FAIL"))
        .then(pl.lit(CRITICAL_MISS))
        .when(
            (model == "FAIL")
            & (inspector == "FAIL")
            & (m != i)
            & ~m.is_in(decisions)
            & ~i.is_in(decisions)
        )
        .then(pl.lit(CLASS_CONFUSION))
        .otherwise(pl.lit(OTHER))
    )


def inspector_override(
    answer: str | None,
    answered_class: str | None,
    true_class: str,
    no_defect_class: str = "NO_DEFECT",
) -> tuple[str, str] | None:
    """What an inspector who sees the part writes when the model's answer was wrong.

    ``answer`` is the served decision (``PASS`` / ``FAIL`` / ``HUMAN_REVIEW``),
    ``answered_class`` its top class, ``true_class`` what the part really has. Returns the
    override's ``(model_prediction, inspector_decision)`` or None when there is nothing to
    overturn: the answer was right, or the model left the part to a person (a review, not an
    override). A missed defect is written with its class (the most useful label: curation turns
    it into an annotation), a false reject with ``PASS``, a wrong defect class with both classes,
    so :func:`override_kind` reads them as critical miss, false reject and class confusion.
    """
    decision = verdict(answer)
    if decision is None or _norm(answer) not in ("PASS", "FAIL"):
        return None
    good = _norm(true_class) == _norm(no_defect_class)
    if decision == "PASS":
        return None if good else ("PASS", true_class)
    model_value = answered_class if answered_class and verdict(answered_class) == "FAIL" else "FAIL"
    if good:
        return (model_value, "PASS")
    if model_value != "FAIL" and _norm(model_value) != _norm(true_class):
        return (model_value, true_class)
    return None
