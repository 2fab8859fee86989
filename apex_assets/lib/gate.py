"""The deployment gate: may this model go to the line?

ARCHITECTURE §1 sets the bar: precision >= 0.95, recall >= 0.93, crack recall
>= 0.99, false-reject rate <= 0.05, all measured on the test split by
:func:`apex_assets.lib.metrics.evaluate_predictions`. Pure Python (no Dagster,
no torch): the ``deployment_gate`` asset check calls :func:`evaluate_gate` and
turns :class:`GateResult` into its pass/fail and metadata.

Choices, and why
----------------
Overall precision and recall are **macro** averages
    Every class counts equally. A support-weighted (or micro) average is
    dominated by the common classes (good parts, scratches) and can pass while
    the rare defect classes, the ones that matter, are missed: 95 % of a test
    set right says nothing about the 2 % that are cracks.
Critical classes are checked as **families**
    ``families`` maps an ontology class id to its member model classes (the
    class itself when the model predicts it, plus its model-class
    descendants, e.g. ``CRACK`` -> ``CRAZING`` in the NEU ontology); recall is
    :func:`~apex_assets.lib.metrics.family_recall`: a crack called "crazing"
    still stops the part.
Fail closed
    It guards a safety-critical deployment, so anything the gate cannot show is
    a failure: a critical family with no test image, an ontology with a
    ``NO_DEFECT`` class but no good parts in the test set (FRR unmeasurable), a
    NaN or missing value, a family member the model does not know.
    Only what cannot apply at all is ``not_applicable``: a critical class the
    ontology does not have (``families`` has no such key; NEU steel may have no
    ``CRACK``), and the false-reject rate when the ontology has no ``NO_DEFECT``
    class (every image is a defect, there is no good part to reject).
Boundaries
    A value exactly at its threshold passes (">=" / "<="). Differences below
    ``1e-9`` are treated as floating-point noise (a macro mean of 1.0, 0.9 and
    0.95 computes as 0.9499999999999998), far below what any test set can
    resolve.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from apex_assets.lib.metrics import EvaluationReport, family_recall

#: Differences smaller than this are rounding noise, not a real gap to the threshold.
_EPS = 1e-9

PASS = "pass"
FAIL = "fail"
NOT_APPLICABLE = "not_applicable"


def _check_share(name: str, value: float) -> None:
    if not isinstance(value, int | float) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"gate threshold {name} must be a share in [0, 1], got {value!r}")


@dataclass(frozen=True)
class GateThresholds:
    """The bar a model must clear; defaults are ARCHITECTURE §1 (config overrides them).

    Every threshold is a share in [0, 1]; anything else (a percentage, a NaN)
    raises ValueError at construction, so a mistyped setting cannot open the gate.
    """

    #: Minimum macro precision.
    min_precision: float = 0.95
    #: Minimum macro recall.
    min_recall: float = 0.93
    #: Ontology class id -> minimum recall of its family.
    critical_recall: Mapping[str, float] = field(default_factory=lambda: {"CRACK": 0.99})
    #: Maximum share of good parts called defective.
    max_false_reject_rate: float = 0.05

    def __post_init__(self) -> None:
        _check_share("min_precision", self.min_precision)
        _check_share("min_recall", self.min_recall)
        _check_share("max_false_reject_rate", self.max_false_reject_rate)
        critical = dict(self.critical_recall)
        for class_id, share in critical.items():
            if not isinstance(class_id, str) or not class_id:
                raise ValueError(f"critical_recall keys must be class ids, got {class_id!r}")
            _check_share(f"critical_recall[{class_id}]", share)
        # Own copy: a caller mutating its dict later must not move the bar.
        object.__setattr__(self, "critical_recall", critical)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, e.g. for MLflow params and asset metadata."""
        return {
            "min_precision": float(self.min_precision),
            "min_recall": float(self.min_recall),
            "critical_recall": {k: float(v) for k, v in self.critical_recall.items()},
            "max_false_reject_rate": float(self.max_false_reject_rate),
        }


@dataclass(frozen=True)
class GateCheck:
    """One line of the gate: a value, its threshold and the verdict."""

    #: ``overall_precision``, ``overall_recall``, ``recall[<CLASS>]``, ``false_reject_rate``.
    name: str
    value: float | None
    threshold: float
    #: ``>=`` (value must reach the threshold) or ``<=`` (value must not exceed it).
    comparison: str
    #: ``pass``, ``fail`` or ``not_applicable``.
    status: str
    #: Human sentence, e.g. ``macro recall 0.912 < 0.93``.
    detail: str


@dataclass(frozen=True)
class GateResult:
    """Verdict of the gate: passed when no check failed."""

    passed: bool
    checks: tuple[GateCheck, ...]

    @property
    def failures(self) -> list[GateCheck]:
        """The checks that failed, in check order."""
        return [c for c in self.checks if c.status == FAIL]

    def reasons(self) -> str:
        """Why the gate failed (``"; "``-joined details of the failed checks); "" when passed."""
        return "; ".join(c.detail for c in self.failures)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return {
            "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
            "reasons": self.reasons(),
        }

    def to_markdown(self) -> str:
        """Verdict line and a table ``check | value | threshold | status``."""
        head = (
            "**Deployment gate: PASSED**"
            if self.passed
            else f"**Deployment gate: FAILED**: {self.reasons()}"
        )
        lines = [head, "", "| check | value | threshold | status |", "| --- | --- | --- | --- |"]
        for c in self.checks:
            value = "n/a" if c.value is None else f"{c.value:.4f}"
            status = c.status.upper() if c.status == FAIL else c.status
            lines.append(f"| {c.name} | {value} | {c.comparison} {c.threshold:g} | {status} |")
        return "\n".join(lines)


def _fmt(value: float, threshold: float) -> str:
    """The value with enough decimals that it visibly differs from the threshold when it does."""
    digits = 3
    while (
        digits < 9
        and abs(value - threshold) > _EPS
        and round(value, digits) == round(threshold, digits)
    ):
        digits += 1
    return f"{value:.{digits}f}"


def _compare(
    name: str, what: str, value: float | None, threshold: float, comparison: str
) -> GateCheck:
    """A check of ``value comparison threshold``; None or NaN fails (fail closed)."""
    if value is None or math.isnan(value):
        # None (not NaN) in the check keeps to_dict() valid JSON.
        why = "is missing" if value is None else "is NaN"
        return GateCheck(name, None, threshold, comparison, FAIL, f"{what} {why}")
    if comparison == ">=":
        ok = value >= threshold - _EPS
        op = ">=" if ok else "<"
    else:
        ok = value <= threshold + _EPS
        op = "<=" if ok else ">"
    detail = f"{what} {_fmt(value, threshold)} {op} {threshold:g}"
    return GateCheck(name, float(value), threshold, comparison, PASS if ok else FAIL, detail)


def _critical_check(
    report: EvaluationReport,
    class_id: str,
    threshold: float,
    families: Mapping[str, Sequence[str]],
) -> GateCheck:
    name = f"recall[{class_id}]"
    if class_id not in families:
        return GateCheck(
            name, None, threshold, ">=", NOT_APPLICABLE, f"no {class_id} class in this ontology"
        )
    members = list(families[class_id])
    try:
        recall, support = family_recall(report, members)
    except ValueError as exc:
        return GateCheck(name, None, threshold, ">=", FAIL, f"{class_id} family: {exc}")
    if support == 0:
        return GateCheck(
            name,
            None,
            threshold,
            ">=",
            FAIL,
            f"no {class_id} images in the test set: recall cannot be shown",
        )
    check = _compare(name, f"{class_id} family recall", recall, threshold, ">=")
    detail = f"{check.detail} ({support:,} images; members {', '.join(members)})"
    return GateCheck(check.name, check.value, threshold, ">=", check.status, detail)


def _frr_check(report: EvaluationReport, threshold: float) -> GateCheck:
    name = "false_reject_rate"
    if report.no_defect_class is None:
        return GateCheck(
            name, None, threshold, "<=", NOT_APPLICABLE, "no NO_DEFECT class in this ontology"
        )
    if report.false_reject_rate is None:
        return GateCheck(
            name,
            None,
            threshold,
            "<=",
            FAIL,
            f"no good parts ({report.no_defect_class}) in the test set: "
            "false-reject rate cannot be shown",
        )
    return _compare(name, "false-reject rate", report.false_reject_rate, threshold, "<=")


def evaluate_gate(
    report: EvaluationReport,
    thresholds: GateThresholds,
    families: Mapping[str, Sequence[str]],
) -> GateResult:
    """Check a report against the thresholds; rules in the module docstring.

    Checks, in order: ``overall_precision`` (macro), ``overall_recall`` (macro),
    one ``recall[<CLASS>]`` per critical class (in ``thresholds.critical_recall``
    order), ``false_reject_rate``. ``passed`` is True when no check has status
    ``fail``.
    """
    checks = [
        _compare(
            "overall_precision",
            "macro precision",
            report.macro.get("precision"),
            thresholds.min_precision,
            ">=",
        ),
        _compare(
            "overall_recall",
            "macro recall",
            report.macro.get("recall"),
            thresholds.min_recall,
            ">=",
        ),
    ]
    checks += [
        _critical_check(report, class_id, share, families)
        for class_id, share in thresholds.critical_recall.items()
    ]
    checks.append(_frr_check(report, thresholds.max_false_reject_rate))
    return GateResult(passed=not any(c.status == FAIL for c in checks), checks=tuple(checks))


_WHAT = {
    "overall_precision": ("macro precision", ">="),
    "overall_recall": ("macro recall", ">="),
    "false_reject_rate": ("false-reject rate", "<="),
}


def rejudge(checks: Sequence[Mapping[str, Any]], thresholds: GateThresholds) -> GateResult:
    """The values a gate measured (``GateResult.to_dict()["checks"]``) against other thresholds.

    Why: a demo (or a what-if in a review) judges a model with one bar and wants to say what
    another bar would have decided, without re-evaluating the model. The rules stay the gate's:
    a missing value fails, a check that did not apply stays not applicable, and a critical class
    the new thresholds do not name is dropped (one they name that was never measured fails).
    """
    out: list[GateCheck] = []
    seen: set[str] = set()
    for check in checks:
        name = str(check["name"])
        seen.add(name)
        value = check.get("value")
        if name.startswith("recall[") and name.endswith("]"):
            class_id = name[len("recall[") : -1]
            if class_id not in thresholds.critical_recall:
                continue
            threshold, what, comparison = (
                float(thresholds.critical_recall[class_id]),
                f"{class_id} family recall",
                ">=",
            )
        elif name in _WHAT:
            what, comparison = _WHAT[name]
            threshold = {
                "overall_precision": thresholds.min_precision,
                "overall_recall": thresholds.min_recall,
                "false_reject_rate": thresholds.max_false_reject_rate,
            }[name]
        else:
            raise ValueError(f"unknown gate check {name!r}")
        if check.get("status") == NOT_APPLICABLE:
            out.append(
                GateCheck(name, None, threshold, comparison, NOT_APPLICABLE, str(check["detail"]))
            )
            continue
        judged = _compare(
            name, what, None if value is None else float(value), threshold, comparison
        )
        old_detail = str(check.get("detail", ""))
        if name.startswith("recall[") and " (" in old_detail and judged.value is not None:
            # keep what the stored check said of its support and members
            judged = dataclasses.replace(
                judged, detail=judged.detail + old_detail[old_detail.index(" (") :]
            )
        out.append(judged)
    for class_id, share in thresholds.critical_recall.items():
        if f"recall[{class_id}]" not in seen:
            out.append(
                GateCheck(
                    f"recall[{class_id}]",
                    None,
                    float(share),
                    ">=",
                    FAIL,
                    f"{class_id} family recall was not measured",
                )
            )
    return GateResult(passed=not any(c.status == FAIL for c in out), checks=tuple(out))
