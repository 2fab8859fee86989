"""Evaluation of an image classifier on the test split, in the plant's terms.

Pure numpy/Polars (no torch, no Dagster), so training, the ``evaluation_report``
asset, serving and monitoring all compute the same numbers the same way.

Input: the true class index of each test image and the model's softmax output
``probs`` (``[n, k]``); the predicted class is the arg-max (ties go to the lower
class index, as ``numpy.argmax`` does). The class list comes from the defect
ontology: it may contain the "good part" class ``NO_DEFECT`` (Apex taxonomy) or
not (NEU steel: every image shows a defect).

Definitions
-----------
Per class (one-vs-rest, from the confusion matrix; rows = true, cols = predicted)
    ``precision = TP / predicted``, ``recall = TP / support``,
    ``f1 = 2PR / (P + R)``; every 0/0 is 0.0 (scikit-learn's ``zero_division=0``).
Macro average
    Unweighted mean of the per-class values over the classes *present*: those
    with support > 0 **or** at least one prediction. This is what scikit-learn's
    ``precision_recall_fscore_support(average="macro", zero_division=0)`` gives
    when it is not told the label list (it uses the union of true and predicted
    labels). A class the test set never shows and the model never predicts says
    nothing about the model and would drag the mean down for no reason; a class
    the model predicts but the test set lacks is a real error source (its
    precision is 0) and counts. Macro F1 is the mean of the per-class F1, not
    the F1 of macro P and R.
Weighted average
    Per-class values weighted by support (true count); weighted recall equals
    accuracy.
False-reject rate (FRR)
    Share of good parts (true ``NO_DEFECT``) that the model calls defective. On
    the line each one is a good part scrapped or sent to rework for nothing: a
    **cost** (throughput, material, inspector time).
False-accept rate (FAR)
    Share of defective parts (true class other than ``NO_DEFECT``) that the model
    calls good. Each one is a defective part shipped to the customer: a
    **safety** and liability risk, which is why the gate also demands a recall
    per critical defect family (see :func:`family_recall` and ``lib/gate.py``).
    Both rates are ``None`` when the ontology has no ``NO_DEFECT`` class (there
    are no good parts to accept or reject) or when the test set has no image on
    the relevant side (the rate cannot be measured, which is not the same as 0).
Confidence histogram
    Top-1 probability in 10 equal bins ``[0, 0.1), [0.1, 0.2), ..., [0.9, 1.0]``
    (the last bin includes 1.0), counting right and wrong predictions apart: it
    shows whether the human-review threshold catches the errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from apex_assets.lib.markdown import frame_to_markdown

#: Number of equal-width bins of the top-1 probability in ``confidence_hist``.
CONFIDENCE_BINS = 10

#: How far outside [0, 1] a probability may stray (float32 softmax rounding) before it is an error.
_PROB_TOLERANCE = 1e-4

_AVG_KEYS = ("precision", "recall", "f1")


@dataclass(frozen=True)
class ClassMetrics:
    """One-vs-rest metrics of one class (0/0 counts as 0.0)."""

    class_id: str
    precision: float
    recall: float
    f1: float
    #: Test images whose true class is this one.
    support: int
    #: Test images the model assigned to this class.
    predicted: int


@dataclass(frozen=True)
class EvaluationReport:
    """Everything the evaluation asset, the gate and the reports need (see the module docstring).

    Compare two reports with ``==`` (the confusion matrix is compared by value);
    a report is not hashable.
    """

    classes: tuple[str, ...]
    n_images: int
    accuracy: float
    per_class: tuple[ClassMetrics, ...]
    #: ``precision``, ``recall``, ``f1``: mean over classes with support > 0 or predictions > 0.
    macro: dict[str, float]
    #: ``precision``, ``recall``, ``f1``: weighted by support.
    weighted: dict[str, float]
    #: int64 ``[k, k]``: rows = true class, columns = predicted class, in ``classes`` order.
    confusion: np.ndarray
    #: The good-part class when it is one of ``classes``, else None.
    no_defect_class: str | None
    false_reject_rate: float | None
    false_accept_rate: float | None
    #: ``(bin_lo, bin_hi, n_correct, n_wrong)`` per bin of the top-1 probability.
    confidence_hist: tuple[tuple[float, float, int, int], ...]
    mean_confidence: float

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EvaluationReport):
            return NotImplemented
        return (
            self.classes == other.classes
            and self.n_images == other.n_images
            and self.accuracy == other.accuracy
            and self.per_class == other.per_class
            and self.macro == other.macro
            and self.weighted == other.weighted
            and self.confusion.shape == other.confusion.shape
            and bool(np.array_equal(self.confusion, other.confusion))
            and self.no_defect_class == other.no_defect_class
            and self.false_reject_rate == other.false_reject_rate
            and self.false_accept_rate == other.false_accept_rate
            and self.confidence_hist == other.confidence_hist
            and self.mean_confidence == other.mean_confidence
        )

    # --- serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (lists, ints, floats, None); :meth:`from_dict` inverts it."""
        return {
            "classes": list(self.classes),
            "n_images": int(self.n_images),
            "accuracy": float(self.accuracy),
            "per_class": [
                {
                    "class_id": m.class_id,
                    "precision": float(m.precision),
                    "recall": float(m.recall),
                    "f1": float(m.f1),
                    "support": int(m.support),
                    "predicted": int(m.predicted),
                }
                for m in self.per_class
            ],
            "macro": {k: float(v) for k, v in self.macro.items()},
            "weighted": {k: float(v) for k, v in self.weighted.items()},
            "confusion": [[int(v) for v in row] for row in self.confusion],
            "no_defect_class": self.no_defect_class,
            "false_reject_rate": _opt_float(self.false_reject_rate),
            "false_accept_rate": _opt_float(self.false_accept_rate),
            "confidence_hist": [
                [float(lo), float(hi), int(ok), int(bad)]
                for lo, hi, ok, bad in self.confidence_hist
            ],
            "mean_confidence": float(self.mean_confidence),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        """Rebuild a report from :meth:`to_dict` output (e.g. read back from JSON)."""
        missing = [f for f in cls.__dataclass_fields__ if f not in data]
        if missing:
            raise ValueError(f"evaluation report dict lacks key(s) {missing}")
        classes = tuple(str(c) for c in data["classes"])
        k = len(classes)
        confusion = np.asarray(data["confusion"], dtype=np.int64).reshape(k, k)
        return cls(
            classes=classes,
            n_images=int(data["n_images"]),
            accuracy=float(data["accuracy"]),
            per_class=tuple(
                ClassMetrics(
                    class_id=str(m["class_id"]),
                    precision=float(m["precision"]),
                    recall=float(m["recall"]),
                    f1=float(m["f1"]),
                    support=int(m["support"]),
                    predicted=int(m["predicted"]),
                )
                for m in data["per_class"]
            ),
            macro={str(k_): float(v) for k_, v in data["macro"].items()},
            weighted={str(k_): float(v) for k_, v in data["weighted"].items()},
            confusion=confusion,
            no_defect_class=data["no_defect_class"],
            false_reject_rate=_opt_float(data["false_reject_rate"]),
            false_accept_rate=_opt_float(data["false_accept_rate"]),
            confidence_hist=tuple(
                (float(lo), float(hi), int(ok), int(bad))
                for lo, hi, ok, bad in data["confidence_hist"]
            ),
            mean_confidence=float(data["mean_confidence"]),
        )

    # --- tables and text ---------------------------------------------------------------

    def per_class_frame(self) -> pl.DataFrame:
        """One row per class: ``class, precision, recall, f1, support, predicted``."""
        return pl.DataFrame(
            {
                "class": [m.class_id for m in self.per_class],
                "precision": [m.precision for m in self.per_class],
                "recall": [m.recall for m in self.per_class],
                "f1": [m.f1 for m in self.per_class],
                "support": [m.support for m in self.per_class],
                "predicted": [m.predicted for m in self.per_class],
            },
            schema={
                "class": pl.String,
                "precision": pl.Float64,
                "recall": pl.Float64,
                "f1": pl.Float64,
                "support": pl.Int64,
                "predicted": pl.Int64,
            },
        )

    def confusion_frame(self) -> pl.DataFrame:
        """``true_class`` then one Int64 column per predicted class (cells = image counts)."""
        data: dict[str, Any] = {"true_class": list(self.classes)}
        schema: dict[str, Any] = {"true_class": pl.String}
        for j, name in enumerate(self.classes):
            data[name] = [int(v) for v in self.confusion[:, j]]
            schema[name] = pl.Int64
        return pl.DataFrame(data, schema=schema)

    def to_markdown(self) -> str:
        """Headline figures, the per-class table and the confusion matrix, as markdown."""
        lines = [
            f"**Accuracy** {self.accuracy:.3f} on {self.n_images:,} test images; "
            f"**macro** precision {self.macro['precision']:.3f}, "
            f"recall {self.macro['recall']:.3f}, F1 {self.macro['f1']:.3f}",
            "",
            self._rates_line(),
            "",
            f"Mean top-1 confidence {self.mean_confidence:.3f}",
            "",
            "**Per class**",
            "",
            frame_to_markdown(
                self.per_class_frame().with_columns(pl.col("precision", "recall", "f1").round(3)),
                max_rows=max(len(self.classes), 1),
            ),
            "",
            "**Confusion matrix** (rows = true class, columns = predicted)",
            "",
            frame_to_markdown(self.confusion_frame(), max_rows=max(len(self.classes), 1)),
        ]
        return "\n".join(lines)

    def _rates_line(self) -> str:
        if self.no_defect_class is None:
            return "**FRR / FAR** n/a (no NO_DEFECT class)"
        good, defective = _sides(self.confusion, self.classes.index(self.no_defect_class))
        if self.false_reject_rate is None:
            frr = "**FRR** n/a (no good parts in the test set)"
        else:
            frr = (
                f"**FRR** {self.false_reject_rate:.3f} "
                f"(good parts rejected, of {good:,}: cost of needless scrap/rework)"
            )
        if self.false_accept_rate is None:
            far = "**FAR** n/a (no defective parts in the test set)"
        else:
            far = (
                f"**FAR** {self.false_accept_rate:.3f} "
                f"(defective parts accepted, of {defective:,}: shipped defects)"
            )
        return f"{frr}; {far}"


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _ratio(num: float, den: float) -> float:
    """num / den with 0/0 (and x/0) = 0.0, scikit-learn's ``zero_division=0``."""
    return float(num) / float(den) if den else 0.0


def _sides(confusion: np.ndarray, nd: int) -> tuple[int, int]:
    """(good parts, defective parts) in the test set, given the NO_DEFECT index."""
    total = int(confusion.sum())
    good = int(confusion[nd, :].sum())
    return good, total - good


def _validate(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Checked, normalised inputs: int64 labels, float64 probs clipped to [0, 1], class tuple."""
    names = tuple(classes)
    if not names:
        raise ValueError("classes is empty: a classifier needs at least one class")
    if any(not isinstance(c, str) or not c for c in names):
        raise ValueError(f"class names must be non-empty strings, got {list(names)}")
    if len(set(names)) != len(names):
        dupes = sorted({c for c in names if names.count(c) > 1})
        raise ValueError(f"classes must be unique; repeated: {dupes}")

    labels = np.asarray(y_true)
    if labels.ndim != 1:
        raise ValueError(f"y_true must be 1-D (one label per image), got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError("no test images: y_true is empty, nothing to evaluate")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)

    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D [n_images, n_classes], got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.number) or p.dtype == bool:
        raise ValueError(f"probs must be numeric, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if p.shape[1] != len(names):
        raise ValueError(
            f"probs has {p.shape[1]} column(s) but there are {len(names)} classes {list(names)}"
        )
    if p.shape[0] != labels.size:
        raise ValueError(f"probs has {p.shape[0]} row(s) but y_true has {labels.size} label(s)")
    bad = ~np.isfinite(p)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(
            f"probs has NaN/inf in {rows.size} row(s), first at image index {int(rows[0])}"
        )
    if p.min() < -_PROB_TOLERANCE or p.max() > 1 + _PROB_TOLERANCE:
        raise ValueError(
            f"probs must be probabilities in [0, 1] (softmax output), got range "
            f"[{p.min():.4g}, {p.max():.4g}]; did you pass logits?"
        )
    out_of_range = (labels < 0) | (labels >= len(names))
    if out_of_range.any():
        first = int(np.flatnonzero(out_of_range)[0])
        raise ValueError(
            f"y_true has {int(out_of_range.sum())} label(s) outside 0..{len(names) - 1}, "
            f"first {int(labels[first])} at image index {first}"
        )
    return labels, np.clip(p, 0.0, 1.0), names


def _confidence_hist(
    top: np.ndarray, correct: np.ndarray
) -> tuple[tuple[float, float, int, int], ...]:
    # Edges k/10 are correctly rounded (0.3 is the double nearest 3/10), so a probability
    # of exactly 0.3 lands in [0.3, 0.4), which linspace's 0.30000000000000004 would not do.
    edges = np.arange(CONFIDENCE_BINS + 1, dtype=np.float64) / CONFIDENCE_BINS
    idx = np.clip(np.searchsorted(edges, top, side="right") - 1, 0, CONFIDENCE_BINS - 1)
    n_ok = np.bincount(idx[correct], minlength=CONFIDENCE_BINS)
    n_bad = np.bincount(idx[~correct], minlength=CONFIDENCE_BINS)
    return tuple(
        (float(edges[b]), float(edges[b + 1]), int(n_ok[b]), int(n_bad[b]))
        for b in range(CONFIDENCE_BINS)
    )


def evaluate_predictions(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    no_defect_class: str | None = "NO_DEFECT",
) -> EvaluationReport:
    """Evaluate softmax outputs against true labels (definitions in the module docstring).

    ``y_true``: true class index per image (``0..k-1``, indices into ``classes``);
    ``probs``: float ``[n, k]`` softmax outputs in ``classes`` order. When
    ``no_defect_class`` is not one of ``classes`` (NEU steel), there is no good-part
    class and FRR/FAR are None.

    Raises ValueError, naming the problem, on empty input, shape mismatch, a
    label out of range, non-integer labels, NaN/inf probabilities or values far
    outside [0, 1] (logits passed by mistake): a silently wrong report would let a
    bad model through the gate.
    """
    labels, p, names = _validate(y_true, probs, classes)
    k = len(names)
    n = int(labels.size)
    pred = np.argmax(p, axis=1).astype(np.int64)
    top = p[np.arange(n), pred]
    correct = pred == labels

    confusion = np.bincount(labels * k + pred, minlength=k * k).reshape(k, k).astype(np.int64)
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)

    per_class: list[ClassMetrics] = []
    for i, name in enumerate(names):
        prec = _ratio(tp[i], predicted[i])
        rec = _ratio(tp[i], support[i])
        f1 = _ratio(2 * prec * rec, prec + rec)
        per_class.append(ClassMetrics(name, prec, rec, f1, int(support[i]), int(predicted[i])))

    present = [m for m in per_class if m.support > 0 or m.predicted > 0]
    macro = {key: float(np.mean([getattr(m, key) for m in present])) for key in _AVG_KEYS}
    weighted = {
        key: float(sum(getattr(m, key) * m.support for m in per_class) / n) for key in _AVG_KEYS
    }

    nd_name = no_defect_class if no_defect_class in names else None
    frr: float | None = None
    far: float | None = None
    if nd_name is not None:
        nd = names.index(nd_name)
        good, defective = _sides(confusion, nd)
        if good:
            frr = float(good - confusion[nd, nd]) / good
        if defective:
            far = float(confusion[:, nd].sum() - confusion[nd, nd]) / defective

    return EvaluationReport(
        classes=names,
        n_images=n,
        accuracy=float(tp.sum()) / n,
        per_class=tuple(per_class),
        macro=macro,
        weighted=weighted,
        confusion=confusion,
        no_defect_class=nd_name,
        false_reject_rate=frr,
        false_accept_rate=far,
        confidence_hist=_confidence_hist(top, correct),
        mean_confidence=float(top.mean()),
    )


def family_recall(report: EvaluationReport, members: Iterable[str]) -> tuple[float | None, int]:
    """Recall of a class *family*: ``(recall, support)``, recall None when support is 0.

    A family is an ontology class and its model-class descendants (``CRACK`` with
    ``CRAZING`` in the NEU ontology). Among test images whose true class is a
    member, the share predicted as *any* member: calling a crack "crazing" still
    stops the part, so it is not a miss for the safety question "was the crack
    caught?". Raises ValueError for a member that is not one of the report's
    classes (a wrong family must not quietly shrink to the members that exist).
    """
    names = list(dict.fromkeys(members))
    unknown = [m for m in names if m not in report.classes]
    if unknown:
        raise ValueError(f"family member(s) {unknown} are not model classes {list(report.classes)}")
    idx = [report.classes.index(m) for m in names]
    support = int(report.confusion[idx, :].sum()) if idx else 0
    if support == 0:
        return None, 0
    hits = int(report.confusion[np.ix_(idx, idx)].sum())
    return hits / support, support


def flat_metrics(report: EvaluationReport, prefix: str = "test_") -> dict[str, float]:
    """The report as flat name -> number pairs for an experiment tracker (MLflow metrics):
    headline figures, the two rates when defined, and the recall of every class."""
    metrics = {
        f"{prefix}accuracy": report.accuracy,
        f"{prefix}macro_precision": report.macro["precision"],
        f"{prefix}macro_recall": report.macro["recall"],
        f"{prefix}macro_f1": report.macro["f1"],
        f"{prefix}weighted_f1": report.weighted["f1"],
        f"{prefix}mean_confidence": report.mean_confidence,
    }
    if report.false_reject_rate is not None:
        metrics[f"{prefix}false_reject_rate"] = report.false_reject_rate
    if report.false_accept_rate is not None:
        metrics[f"{prefix}false_accept_rate"] = report.false_accept_rate
    for m in report.per_class:
        metrics[f"{prefix}recall_{m.class_id}"] = m.recall
    return {k: float(v) for k, v in metrics.items()}
