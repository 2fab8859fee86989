"""The override vocabulary: how values are read, and what an inspector writes for a wrong answer."""

from __future__ import annotations

import polars as pl
import pytest

from apex_assets.lib.overrides import (
    CLASS_CONFUSION,
    CRITICAL_MISS,
    FALSE_REJECT,
    OTHER,
    inspector_override,
    kind_expr,
    override_kind,
    verdict,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("PASS", "PASS"),
        (" no_defect ", "PASS"),
        ("FAIL", "FAIL"),
        ("SCRAP", "FAIL"),
        ("CRACK", "FAIL"),
        ("HUMAN_REVIEW", None),
        ("", None),
        (None, None),
    ],
)
def test_verdict(value, expected) -> None:
    assert verdict(value) == expected


@pytest.mark.parametrize(
    ("answer", "answered_class", "truth", "expected", "kind"),
    [
        ("PASS", "NO_DEFECT", "NO_DEFECT", None, None),  # right
        ("PASS", "NO_DEFECT", "CRACK", ("PASS", "CRACK"), CRITICAL_MISS),
        ("FAIL", "SURFACE_SCRATCH", "NO_DEFECT", ("SURFACE_SCRATCH", "PASS"), FALSE_REJECT),
        (
            "FAIL",
            "SURFACE_SCRATCH",
            "SURFACE_PIT",
            ("SURFACE_SCRATCH", "SURFACE_PIT"),
            CLASS_CONFUSION,
        ),
        ("FAIL", "CRACK", "CRACK", None, None),  # right
        ("FAIL", None, "NO_DEFECT", ("FAIL", "PASS"), FALSE_REJECT),  # no class named
        ("FAIL", None, "CRACK", None, None),  # a reject of a defective part: right
        ("HUMAN_REVIEW", "CRACK", "NO_DEFECT", None, None),  # left to a person: not an override
        (None, None, "CRACK", None, None),
    ],
)
def test_inspector_override_is_read_back_as_its_kind(answer, answered_class, truth, expected, kind):
    got = inspector_override(answer, answered_class, truth)
    assert got == expected
    if got is not None:
        assert override_kind(*got) == kind
        frame = pl.DataFrame({"model_prediction": [got[0]], "inspector_decision": [got[1]]})
        assert frame.select(kind_expr()).item() == kind  # the vectorised reading agrees


def test_override_kind_of_decision_words_is_not_a_class_confusion() -> None:
    assert override_kind("FAIL", "SCRAP") == OTHER
    assert override_kind("SURFACE_SCRATCH", "FAIL") == OTHER
    assert override_kind("HUMAN_REVIEW", "PASS") == OTHER
