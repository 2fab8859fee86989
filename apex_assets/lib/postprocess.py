"""Serving post-processing: class probabilities -> PASS / FAIL / HUMAN_REVIEW, defects, action.

Why a separate, NumPy-only module: the BentoML service may run ONNX Runtime without torch, and
the same rules must hold wherever a prediction is turned into a line decision (the service, the
shadow model, offline replays in monitoring). These are product decisions, so they live in one
place, are spelled out here and are tested branch by branch.

Rules (ARCHITECTURE section 7)
------------------------------
``top`` is the arg-max class (ties: the first in model class order) and ``p_top`` its
probability, reported as ``overall_confidence``.

1. Unsure model -> human.  ``p_top < confidence_threshold`` (0.8): prediction and action are
   ``HUMAN_REVIEW``; the threshold itself is *not* review (``0.8`` is confident). The defects
   the model sees are still listed (the defect top-1 and every defect class with probability
   ``>= defect_threshold``) so the inspector starts from the model's hint.
2. Confident NO_DEFECT -> ``PASS``, action ``PASS``, no defects, *unless* some defect class
   still reaches ``defect_threshold``; then the image is ``FAIL`` with those defects.
   Why FAIL: with the defaults this cannot happen (probabilities sum to 1, and 0.8 + 0.5 > 1);
   it only arises when an operator set ``defect_threshold <= 1 - confidence_threshold`` on
   purpose, to be stricter (say a crack at 15 % must not ship). Honouring that setting is the
   point of it; a false reject costs a rework check, a shipped crack costs a recall.
3. Otherwise ``FAIL``: the defects are every defect class (not NO_DEFECT) with probability
   ``>= defect_threshold``, and always the top-1 (multi-defect handling), sorted by confidence
   (ties: model class order).

Severity of a defect is the ontology's default severity of its class (:func:`class_severity`).
The recommended action of a FAIL is the worst action of its defects, ``action_by_severity``
(minor -> PASS, major -> REWORK, critical -> SCRAP) ranked SCRAP > REWORK > HUMAN_REVIEW > PASS,
so a non-monotone mapping can never downgrade a part. A FAIL whose defects are all minor is
therefore action PASS: cosmetic, the part ships, the defect is still recorded.

An ontology without NO_DEFECT (NEU steel: every image shows a defect) is called with
``no_defect_class=None``: every image is FAIL or HUMAN_REVIEW, never PASS.

``localize(class_index)`` (e.g. :func:`apex_assets.lib.cam.localizer`) gives the bounding box
(pixels of the original image) and area percentage of a defect; it is called once per reported
defect and for nothing else, because every call costs a CAM.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from apex_assets.lib.ontology import NO_DEFECT, Ontology

__all__ = [
    "ACTIONS",
    "PREDICTIONS",
    "Box",
    "Decision",
    "Defect",
    "PostprocessConfig",
    "class_severity",
    "decide",
]

PREDICTIONS: tuple[str, ...] = ("PASS", "FAIL", "HUMAN_REVIEW")
# Least to most consequential: the worst action of an image's defects wins.
ACTIONS: tuple[str, ...] = ("PASS", "HUMAN_REVIEW", "REWORK", "SCRAP")
_ACTION_RANK = {a: i for i, a in enumerate(ACTIONS)}

# How far the probabilities may sum from 1 (float32 softmax over many classes, rounding).
_SUM_TOLERANCE = 1e-3


def _default_actions() -> Mapping[str, str]:
    return {"minor": "PASS", "major": "REWORK", "critical": "SCRAP"}


@dataclass(frozen=True)
class PostprocessConfig:
    """Thresholds and the severity -> action table (defaults: the seed's values).

    ``confidence_threshold``: top-1 probability below it goes to the human inspector.
    ``defect_threshold``: every defect class with at least this probability is reported.
    """

    confidence_threshold: float = 0.8
    defect_threshold: float = 0.5
    action_by_severity: Mapping[str, str] = field(default_factory=_default_actions, hash=False)

    def __post_init__(self) -> None:
        for name in ("confidence_threshold", "defect_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
            if not (0.0 < float(value) <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.action_by_severity, Mapping):
            raise ValueError(
                f"action_by_severity must map severity -> action, got {self.action_by_severity!r}"
            )
        bad = {s: a for s, a in self.action_by_severity.items() if a not in ACTIONS}
        if bad:
            raise ValueError(f"action_by_severity: unknown action(s) {bad!r}; use one of {ACTIONS}")
        # Read-only copy: the config is frozen, the caller's dict must not change it later.
        object.__setattr__(
            self, "action_by_severity", MappingProxyType(dict(self.action_by_severity))
        )

    def check_ontology(self, ontology: Ontology) -> None:
        """Raise ValueError when a severity of the ontology's scale has no action.

        Why: a custom scale ("low", "high") with the default table would leave a defect without
        an action; better to fail when the service starts than on the first such part.
        """
        missing = [s for s in ontology.severity_scale if s not in self.action_by_severity]
        if missing:
            raise ValueError(
                f"action_by_severity has no action for severity level(s) {missing} "
                f"of ontology {ontology.name!r}"
            )


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in pixels of the ORIGINAL image (top-left corner, size)."""

    x: int
    y: int
    width: int
    height: int

    def to_dict(self) -> dict[str, int]:
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height}


@dataclass(frozen=True)
class Defect:
    """One reported defect; box and area are None when not localized."""

    class_id: str
    confidence: float
    severity: str | None
    bounding_box: Box | None
    area_percentage: float | None

    def to_dict(self) -> dict[str, Any]:
        """Serving-contract form: ``class, confidence, severity, bounding_box, area_percentage``."""
        return {
            "class": self.class_id,
            "confidence": float(self.confidence),
            "severity": self.severity,
            "bounding_box": None if self.bounding_box is None else self.bounding_box.to_dict(),
            "area_percentage": None
            if self.area_percentage is None
            else float(self.area_percentage),
        }


@dataclass(frozen=True)
class Decision:
    """What the line is told about one image (see the module doc for the rules)."""

    prediction: str  # PASS | FAIL | HUMAN_REVIEW
    defects: tuple[Defect, ...]  # sorted by confidence desc
    overall_confidence: float  # top-1 probability
    top_class: str
    recommended_action: str  # PASS | REWORK | SCRAP | HUMAN_REVIEW

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the serving contract's keys (plain Python types only)."""
        return {
            "prediction": self.prediction,
            "defects": [d.to_dict() for d in self.defects],
            "overall_confidence": float(self.overall_confidence),
            "top_class": self.top_class,
            "recommended_action": self.recommended_action,
        }


def class_severity(ontology: Ontology, class_id: str) -> str | None:
    """Severity reported for a predicted class: its default severity in the ontology.

    The ontology resolves the default (``default_severity``, else the first, least severe, of
    ``severity_levels``), so training reports and serving agree. None for NO_DEFECT (also
    when the ontology has no NO_DEFECT class). KeyError for a class the ontology lacks.
    """
    if class_id == NO_DEFECT:
        return None
    return ontology.default_severity(class_id)


def _validate_probs(probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    arr = np.asarray(probs)
    if arr.ndim != 1:
        raise ValueError(f"probs must be 1-D (one image), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("probs is empty")
    if arr.size != len(classes):
        raise ValueError(f"probs has {arr.size} values but there are {len(classes)} classes")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"probs must be real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("probs contains NaN or infinity")
    if arr.min() < 0.0 or arr.max() > 1.0 + _SUM_TOLERANCE:
        raise ValueError(
            f"probs must lie in [0, 1], got min {arr.min():.6g}, max {arr.max():.6g} "
            "(logits instead of softmax probabilities?)"
        )
    total = float(arr.sum())
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"probs must sum to 1, got {total:.6g}")
    return arr


def _validate_classes(
    classes: Sequence[str], ontology: Ontology, no_defect_class: str | None
) -> None:
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes repeat an id: {list(classes)}")
    if no_defect_class is not None and no_defect_class not in classes:
        raise ValueError(f"no_defect_class {no_defect_class!r} is not one of the classes")
    for cid in classes:
        if cid == no_defect_class:
            continue
        try:
            ontology.get(cid)
        except KeyError:
            raise ValueError(
                f"model class {cid!r} is not a class of ontology {ontology.name!r}"
            ) from None


def decide(
    probs: np.ndarray,
    classes: Sequence[str],
    ontology: Ontology,
    cfg: PostprocessConfig,
    *,
    no_defect_class: str | None,
    localize: Callable[[int], tuple[Box, float] | None] | None = None,
) -> Decision:
    """Turn one image's softmax probabilities into the line's decision (rules: module doc).

    ``classes`` are the model's classes in output order; ``no_defect_class`` the one meaning
    "defect-free" (``NO_DEFECT``), or None for an ontology without it. Raises ValueError for
    probabilities that are not a probability vector over ``classes``, for classes unknown to
    the ontology and for a severity with no action in ``cfg``.
    """
    classes = list(classes)
    arr = _validate_probs(probs, classes)
    _validate_classes(classes, ontology, no_defect_class)
    cfg.check_ontology(ontology)

    top = int(np.argmax(arr))  # first maximum: model class order breaks ties
    p_top = float(arr[top])
    no_defect_idx = classes.index(no_defect_class) if no_defect_class is not None else None

    reported = [
        i
        for i in range(len(classes))
        if i != no_defect_idx and (arr[i] >= cfg.defect_threshold or i == top)
    ]
    reported.sort(key=lambda i: (-arr[i], i))

    defects: list[Defect] = []
    for i in reported:
        found = localize(i) if localize is not None else None
        box, area = found if found is not None else (None, None)
        defects.append(
            Defect(
                class_id=classes[i],
                confidence=float(arr[i]),
                severity=class_severity(ontology, classes[i]),
                bounding_box=box,
                area_percentage=None if area is None else float(area),
            )
        )

    if p_top < cfg.confidence_threshold:
        prediction, action = "HUMAN_REVIEW", "HUMAN_REVIEW"
    elif not defects:  # confident NO_DEFECT and no defect class reaches defect_threshold
        prediction, action = "PASS", "PASS"
    else:
        prediction = "FAIL"
        # A defect without a severity (a class with no levels) cannot be graded: a person decides.
        actions = [
            "HUMAN_REVIEW" if d.severity is None else cfg.action_by_severity[d.severity]
            for d in defects
        ]
        action = max(actions, key=_ACTION_RANK.__getitem__)
    return Decision(
        prediction=prediction,
        defects=tuple(defects),
        overall_confidence=p_top,
        top_class=classes[top],
        recommended_action=action,
    )
