"""Tests of serving post-processing: every decision branch on crafted probability vectors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apex_assets.lib.ontology import NO_DEFECT, Ontology, load_ontology
from apex_assets.lib.postprocess import (
    Box,
    Decision,
    Defect,
    PostprocessConfig,
    class_severity,
    decide,
)

# Apex model classes: NO_DEFECT, SURFACE_SCRATCH (minor), BURR (minor), SURFACE_PIT (minor),
# CRACK (critical), DIMENSIONAL_OOS (major).
APEX = load_ontology("apex_defect_taxonomy")
APEX_CLASSES = APEX.class_ids()
NEU = load_ontology("neu_steel")
NEU_CLASSES = NEU.class_ids()
CFG = PostprocessConfig()


def apex_probs(**by_class: float) -> np.ndarray:
    p = np.zeros(len(APEX_CLASSES))
    for cid, v in by_class.items():
        p[APEX_CLASSES.index(cid)] = v
    return p


def run_apex(probs: np.ndarray, cfg: PostprocessConfig = CFG, **kw) -> Decision:
    return decide(probs, APEX_CLASSES, APEX, cfg, no_defect_class=NO_DEFECT, **kw)


def summary(d: Decision) -> list[tuple[str, float, str | None]]:
    return [(x.class_id, round(x.confidence, 6), x.severity) for x in d.defects]


def test_class_lists_are_the_expected_ones():
    assert APEX_CLASSES == [
        "NO_DEFECT",
        "SURFACE_SCRATCH",
        "BURR",
        "SURFACE_PIT",
        "CRACK",
        "DIMENSIONAL_OOS",
    ]
    assert NEU_CLASSES == [
        "CRAZING",
        "INCLUSION",
        "PATCHES",
        "PITTED_SURFACE",
        "ROLLED_IN_SCALE",
        "SCRATCHES",
    ]


def test_class_severity_from_ontology():
    assert class_severity(APEX, "CRACK") == "critical"  # explicit default_severity
    assert class_severity(APEX, "SURFACE_SCRATCH") == "minor"  # first of its levels
    assert class_severity(APEX, "DIMENSIONAL_OOS") == "major"  # first of [major, critical]
    assert class_severity(APEX, NO_DEFECT) is None
    assert class_severity(NEU, NO_DEFECT) is None  # NEU has no NO_DEFECT class at all
    assert class_severity(NEU, "PATCHES") == "minor"
    assert class_severity(NEU, "INCLUSION") == "major"
    with pytest.raises(KeyError, match="BOGUS"):
        class_severity(APEX, "BOGUS")


def test_confident_defect_fails_with_its_severity_action():
    d = run_apex(apex_probs(NO_DEFECT=0.05, CRACK=0.9, DIMENSIONAL_OOS=0.05))
    assert d.prediction == "FAIL"
    assert d.top_class == "CRACK"
    assert d.overall_confidence == pytest.approx(0.9)
    assert summary(d) == [("CRACK", 0.9, "critical")]
    assert d.recommended_action == "SCRAP"


@pytest.mark.parametrize(
    ("cls", "action"),
    [
        ("SURFACE_SCRATCH", "PASS"),
        ("BURR", "PASS"),
        ("CRACK", "SCRAP"),
        ("DIMENSIONAL_OOS", "REWORK"),
    ],
)
def test_severity_to_action_mapping(cls, action):
    d = run_apex(apex_probs(**{cls: 0.95, "NO_DEFECT": 0.05}))
    # A minor defect is still a FAIL (recorded), but the part ships: action PASS.
    assert d.prediction == "FAIL"
    assert d.recommended_action == action


def test_confidence_exactly_at_threshold_is_not_review():
    d = run_apex(apex_probs(NO_DEFECT=0.2, CRACK=0.8))
    assert d.prediction == "FAIL"
    assert d.recommended_action == "SCRAP"
    d = run_apex(apex_probs(NO_DEFECT=0.8, CRACK=0.2))
    assert (d.prediction, d.recommended_action, d.defects) == ("PASS", "PASS", ())


def test_below_threshold_goes_to_human_review_with_defects_listed():
    d = run_apex(apex_probs(NO_DEFECT=0.21, CRACK=0.79))
    assert d.prediction == "HUMAN_REVIEW"
    assert d.recommended_action == "HUMAN_REVIEW"
    assert d.overall_confidence == pytest.approx(0.79)
    assert summary(d) == [("CRACK", 0.79, "critical")]


def test_review_lists_the_defect_top1_even_below_defect_threshold():
    d = run_apex(apex_probs(NO_DEFECT=0.3, BURR=0.4, SURFACE_PIT=0.3))
    assert d.prediction == "HUMAN_REVIEW"
    assert d.top_class == "BURR"
    assert summary(d) == [("BURR", 0.4, "minor")]  # 0.3 < defect_threshold 0.5: not listed


def test_review_with_no_defect_top1_lists_nothing_weak():
    d = run_apex(apex_probs(NO_DEFECT=0.6, CRACK=0.4))
    assert (d.prediction, d.recommended_action, d.top_class) == (
        "HUMAN_REVIEW",
        "HUMAN_REVIEW",
        NO_DEFECT,
    )
    assert d.defects == ()


def test_confident_no_defect_passes_without_localizing():
    calls: list[int] = []

    def localize(i: int):
        calls.append(i)
        return Box(0, 0, 1, 1), 1.0

    d = run_apex(apex_probs(NO_DEFECT=0.97, SURFACE_PIT=0.03), localize=localize)
    assert (d.prediction, d.recommended_action, d.defects, d.top_class) == (
        "PASS",
        "PASS",
        (),
        NO_DEFECT,
    )
    assert d.overall_confidence == pytest.approx(0.97)
    assert calls == []


def test_confident_no_defect_with_strong_secondary_defect_fails():
    # Only possible when defect_threshold <= 1 - confidence_threshold (a deliberately strict
    # setting); the rule honours it: FAIL with the secondary defect.
    cfg = PostprocessConfig(defect_threshold=0.1)
    d = run_apex(apex_probs(NO_DEFECT=0.85, CRACK=0.15), cfg)
    assert d.prediction == "FAIL"
    assert d.top_class == NO_DEFECT
    assert d.overall_confidence == pytest.approx(0.85)
    assert summary(d) == [("CRACK", 0.15, "critical")]
    assert d.recommended_action == "SCRAP"


def test_multi_defect_reports_all_above_threshold_and_takes_worst_action():
    cfg = PostprocessConfig(confidence_threshold=0.5, defect_threshold=0.3)
    d = run_apex(apex_probs(NO_DEFECT=0.05, SURFACE_SCRATCH=0.35, DIMENSIONAL_OOS=0.6), cfg)
    assert d.prediction == "FAIL"
    assert summary(d) == [("DIMENSIONAL_OOS", 0.6, "major"), ("SURFACE_SCRATCH", 0.35, "minor")]
    assert d.recommended_action == "REWORK"  # major beats minor
    d = run_apex(apex_probs(BURR=0.55, CRACK=0.4, SURFACE_PIT=0.05), cfg)
    assert [x.class_id for x in d.defects] == ["BURR", "CRACK"]
    assert d.recommended_action == "SCRAP"  # the critical secondary defect decides


def test_ties_break_by_model_class_order():
    d = run_apex(apex_probs(SURFACE_SCRATCH=0.5, BURR=0.5))
    assert d.top_class == "SURFACE_SCRATCH"
    assert [x.class_id for x in d.defects] == ["SURFACE_SCRATCH", "BURR"]
    assert d.prediction == "HUMAN_REVIEW"


def test_non_monotone_action_table_never_downgrades():
    cfg = PostprocessConfig(
        confidence_threshold=0.5,
        defect_threshold=0.3,
        action_by_severity={"minor": "REWORK", "major": "PASS", "critical": "HUMAN_REVIEW"},
    )
    d = run_apex(apex_probs(DIMENSIONAL_OOS=0.6, BURR=0.4), cfg)
    assert d.recommended_action == "REWORK"  # REWORK > PASS, whatever the severity order
    d = run_apex(apex_probs(DIMENSIONAL_OOS=0.6, CRACK=0.4), cfg)
    assert d.recommended_action == "HUMAN_REVIEW"  # HUMAN_REVIEW > PASS


def test_localize_called_for_reported_defects_only():
    calls: list[int] = []

    def localize(i: int):
        calls.append(i)
        if APEX_CLASSES[i] == "CRACK":
            return Box(10, 20, 30, 40), 2.5
        return None

    cfg = PostprocessConfig(confidence_threshold=0.5, defect_threshold=0.3)
    d = run_apex(
        apex_probs(NO_DEFECT=0.05, CRACK=0.6, BURR=0.3, SURFACE_PIT=0.05), cfg, localize=localize
    )
    assert sorted(calls) == [APEX_CLASSES.index("BURR"), APEX_CLASSES.index("CRACK")]
    crack, burr = d.defects
    assert (crack.bounding_box, crack.area_percentage) == (Box(10, 20, 30, 40), 2.5)
    assert (burr.bounding_box, burr.area_percentage) == (None, None)


def test_neu_without_no_defect_never_passes():
    d = decide(
        np.array([0.9, 0.02, 0.02, 0.02, 0.02, 0.02]), NEU_CLASSES, NEU, CFG, no_defect_class=None
    )
    assert (d.prediction, d.top_class, d.recommended_action) == ("FAIL", "CRAZING", "SCRAP")
    assert summary(d) == [("CRAZING", 0.9, "critical")]
    d = decide(
        np.array([0.0, 0.0, 0.95, 0.05, 0.0, 0.0]), NEU_CLASSES, NEU, CFG, no_defect_class=None
    )
    assert (d.prediction, d.recommended_action) == ("FAIL", "PASS")  # PATCHES: minor
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.dirichlet(np.full(len(NEU_CLASSES), 0.3))
        d = decide(p, NEU_CLASSES, NEU, CFG, no_defect_class=None)
        assert d.prediction in {"FAIL", "HUMAN_REVIEW"}
        assert len(d.defects) >= 1
        assert d.defects[0].class_id == d.top_class


def test_float32_probabilities_accepted():
    p = np.array([0.05, 0.0, 0.0, 0.0, 0.9, 0.05], dtype=np.float32)
    d = run_apex(p)
    assert d.prediction == "FAIL"
    assert isinstance(d.overall_confidence, float)


def test_to_dict_is_json_ready_with_contract_keys():
    p = np.array([0.05, 0.0, 0.0, 0.0, 0.9, 0.05], dtype=np.float32)
    d = run_apex(p, localize=lambda i: (Box(1, 2, 3, 4), 12.5))
    out = d.to_dict()
    assert set(out) == {
        "prediction",
        "defects",
        "overall_confidence",
        "top_class",
        "recommended_action",
    }
    assert out["defects"] == [
        {
            "class": "CRACK",
            "confidence": pytest.approx(0.9),
            "severity": "critical",
            "bounding_box": {"x": 1, "y": 2, "width": 3, "height": 4},
            "area_percentage": 12.5,
        }
    ]
    assert type(out["overall_confidence"]) is float
    assert type(out["defects"][0]["confidence"]) is float
    assert json.loads(json.dumps(out))["prediction"] == "FAIL"
    unlocalized = Defect("BURR", 0.6, "minor", None, None).to_dict()
    assert unlocalized == {
        "class": "BURR",
        "confidence": 0.6,
        "severity": "minor",
        "bounding_box": None,
        "area_percentage": None,
    }


@pytest.mark.parametrize(
    ("probs", "message"),
    [
        (np.ones((1, 6)) / 6, "1-D"),
        (np.ones(5) / 5, "5 values but there are 6 classes"),
        (np.array([]), "empty"),
        (np.array([np.nan, 0.5, 0.5, 0, 0, 0]), "NaN"),
        (np.array([-0.1, 1.1, 0, 0, 0, 0]), r"\[0, 1\]"),
        (np.array([3.0, -1.0, 0.5, 0.1, -2.0, 0.4]), r"\[0, 1\]"),  # logits, not probabilities
        (np.array([0.5, 0.4, 0, 0, 0, 0]), "sum to 1"),
        (np.array(["a"] * 6), "real numbers"),
    ],
)
def test_bad_probabilities_rejected(probs, message):
    with pytest.raises(ValueError, match=message):
        run_apex(probs)


def test_bad_classes_rejected():
    p = np.array([0.5, 0.5])
    with pytest.raises(ValueError, match="repeat"):
        decide(p, ["CRACK", "CRACK"], APEX, CFG, no_defect_class=None)
    with pytest.raises(ValueError, match="no_defect_class"):
        decide(p, ["CRACK", "BURR"], APEX, CFG, no_defect_class=NO_DEFECT)
    with pytest.raises(ValueError, match="'SPLAT' is not a class"):
        decide(p, [NO_DEFECT, "SPLAT"], APEX, CFG, no_defect_class=NO_DEFECT)
    # NEU has no NO_DEFECT, so naming it as a model class is an error without no_defect_class.
    with pytest.raises(ValueError, match="NO_DEFECT"):
        decide(p, [NO_DEFECT, "CRAZING"], NEU, CFG, no_defect_class=None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"confidence_threshold": 0.0}, "confidence_threshold"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"defect_threshold": -0.2}, "defect_threshold"),
        ({"defect_threshold": True}, "defect_threshold"),
        ({"defect_threshold": "0.5"}, "defect_threshold"),
        ({"action_by_severity": {"minor": "SHIP"}}, "SHIP"),
        ({"action_by_severity": ["PASS"]}, "action_by_severity"),
    ],
)
def test_bad_config_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PostprocessConfig(**kwargs)


def test_config_accepts_one_and_freezes_action_table():
    table = {"minor": "PASS", "major": "REWORK", "critical": "SCRAP"}
    cfg = PostprocessConfig(confidence_threshold=1, defect_threshold=1.0, action_by_severity=table)
    assert cfg.confidence_threshold == 1.0
    table["critical"] = "PASS"  # the caller's dict changes; the config does not
    assert cfg.action_by_severity["critical"] == "SCRAP"
    with pytest.raises(TypeError):
        cfg.action_by_severity["critical"] = "PASS"  # type: ignore[index]
    # Threshold 1.0: only a certain prediction avoids review.
    d = run_apex(apex_probs(NO_DEFECT=0.01, CRACK=0.99), cfg)
    assert d.prediction == "HUMAN_REVIEW"


def test_severity_without_action_is_an_error():
    custom = Ontology.from_dict(
        {
            "ontology": "custom",
            "version": "1.0.0",
            "severity_scale": ["low", "high"],
            "classes": [
                {
                    "id": "DENT",
                    "label": "Dent",
                    "description": "d",
                    "aliases": [],
                    "severity_levels": ["high"],
                    "parent": None,
                }
            ],
        }
    )
    with pytest.raises(ValueError, match=r"no action for severity level\(s\) \['low', 'high'\]"):
        decide(np.array([0.1, 0.9]), [NO_DEFECT, "DENT"], custom, CFG, no_defect_class=NO_DEFECT)
    cfg = PostprocessConfig(action_by_severity={"low": "PASS", "high": "SCRAP"})
    d = decide(np.array([0.1, 0.9]), [NO_DEFECT, "DENT"], custom, cfg, no_defect_class=NO_DEFECT)
    assert (d.prediction, d.recommended_action) == ("FAIL", "SCRAP")
