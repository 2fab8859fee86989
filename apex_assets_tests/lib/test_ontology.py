"""Defect ontology: bundled taxonomies, label matching, validation, fingerprints.

Expected values are written out here (the simulator's raw spellings are read
from the simulator, which is the other side of the contract), never computed
with the code under test.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from apex_assets.lib.ontology import (
    NO_DEFECT,
    DefectClass,
    Ontology,
    OntologyError,
    available_ontologies,
    load_ontology,
    normalize_label,
    normalize_labels_expr,
    validate_taxonomy,
)
from apex_assets.simulator import plant

APEX_CLASSES = ["SURFACE_SCRATCH", "BURR", "SURFACE_PIT", "CRACK", "DIMENSIONAL_OOS"]
NEU_RAW = {
    "crazing": "CRAZING",
    "inclusion": "INCLUSION",
    "patches": "PATCHES",
    "pitted_surface": "PITTED_SURFACE",
    "rolled-in_scale": "ROLLED_IN_SCALE",
    "scratches": "SCRATCHES",
}
EXPECTED_FAMILY_CLASS = {
    "scratch": "SURFACE_SCRATCH",
    "burr": "BURR",
    "pit": "SURFACE_PIT",
    "crack": "CRACK",
    "oos": "DIMENSIONAL_OOS",
}


@pytest.fixture(scope="module")
def apex() -> Ontology:
    return load_ontology("apex_defect_taxonomy")


@pytest.fixture(scope="module")
def neu() -> Ontology:
    return load_ontology("neu_steel")


def minimal(**top) -> dict:
    """A small valid taxonomy: CRACK (root) and SCRATCH, plus overrides."""
    data = {
        "ontology": "mini",
        "version": "0.1.0",
        "description": "test",
        "classes": [
            {
                "id": "CRACK",
                "label": "Crack",
                "description": "a crack",
                "aliases": ["fracture"],
                "severity_levels": ["critical"],
                "parent": None,
            },
            {
                "id": "SCRATCH",
                "label": "Scratch",
                "description": "a scratch",
                "aliases": ["scuff mark"],
                "severity_levels": ["minor", "major"],
                "parent": None,
            },
        ],
    }
    data.update(top)
    return data


def write(tmp_path: Path, data: dict, name: str = "tax.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def load_error(tmp_path: Path, data: dict) -> OntologyError:
    path = write(tmp_path, data)
    with pytest.raises(OntologyError) as info:
        load_ontology(path)
    assert str(path) in str(info.value)  # every message names the file
    return info.value


# -- normalisation and matching ---------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "Surface Scratch",
        "surface_scratch",
        "SURFACE-SCRATCH",
        " surface  scratch ",
        "Surface-_- scratch",
        "\tsurface\u00a0scratch\n",
        "__surface__scratch__",
    ],
)
def test_normalize_label_is_case_space_and_separator_insensitive(raw):
    assert normalize_label(raw) == "surface_scratch"


def test_normalize_label_keeps_other_characters_and_empties():
    assert normalize_label("rolled-in_scale") == "rolled_in_scale"
    assert normalize_label("Out.of.spec") == "out.of.spec"  # '.' is not a separator
    assert normalize_label(" _-  ") == ""
    with pytest.raises(TypeError):
        normalize_label(None)  # type: ignore[arg-type]


def test_polars_normalisation_agrees_with_python():
    labels = [
        "Surface Scratch",
        "  EDGE-burr ",
        "a\u2003b\u3000c",
        "ΣΑΣ",
        "Straße",
        "x\x1cy",
        "--",
        "",
        "Éclat_DE-surface",
    ]
    got = pl.select(normalize_labels_expr(pl.lit(pl.Series(labels)))).to_series().to_list()
    assert got == [normalize_label(s) for s in labels]


def test_match_ignores_case_spaces_and_separators(apex):
    for raw in ["edge burr", "EDGE_BURR", "Edge-Burr", "  edge   burr ", "eDgE-_burr"]:
        assert apex.match(raw) == "BURR"
    # a class's own id and label are aliases
    assert apex.match("dimensional_oos") == "DIMENSIONAL_OOS"
    assert apex.match("Dimensional out of spec") == "DIMENSIONAL_OOS"


def test_match_returns_none_for_empty_and_unknown_and_never_guesses(apex):
    for raw in [None, "", "   ", "_-", "scratc", "scratch mark", "crack!", "pit 2"]:
        assert apex.match(raw) is None, raw


def test_every_simulator_raw_label_maps_to_its_class(apex):
    assert {plant.CLASS_OF_FAMILY[f] for f in plant.FAMILIES} == set(APEX_CLASSES)
    separators = ["_", "-", " ", "  "]
    for family, spellings in plant.RAW_LABEL_FAMILIES.items():
        expected = EXPECTED_FAMILY_CLASS[family]
        assert plant.CLASS_OF_FAMILY[family] == expected
        for spelling in spellings:
            words = spelling.replace("_", " ").replace("-", " ").split()
            for sep, case in itertools.product(separators, [str.lower, str.upper, str.title]):
                raw = case(sep.join(words))
                for padded in (raw, f" {raw}", f"{raw} "):
                    assert apex.match(padded) == expected, padded
    # the QMS defect codes of inspection_results
    for code, family in plant.QMS_CODES.items():
        assert apex.match(code) == EXPECTED_FAMILY_CLASS[family]


def test_simulator_unmapped_labels_stay_unmapped(apex, neu):
    assert set(plant.UNMAPPED_LABELS) >= {"discoloration", "stain", "oil stain"}
    for raw in (*plant.UNMAPPED_LABELS, "Oil-Stain", "STAIN", "discolouration"):
        assert apex.match(raw) is None, raw
        assert neu.match(raw) is None, raw


def test_required_extra_apex_aliases(apex):
    assert apex.match("out of tolerance") == "DIMENSIONAL_OOS"
    assert apex.match("Dimensional") == "DIMENSIONAL_OOS"
    assert apex.match("out-of-spec") == "DIMENSIONAL_OOS"


def test_no_defect_matches_only_when_the_ontology_has_it(apex, neu):
    assert apex.match("no defect") == NO_DEFECT
    assert apex.match("NO_DEFECT") == NO_DEFECT
    assert neu.match("NO_DEFECT") is None


def test_every_neu_raw_name_maps(neu):
    for raw, class_id in NEU_RAW.items():
        assert neu.match(raw) == class_id
        assert neu.match(raw.upper()) == class_id
    # NEU-CLS file name abbreviations
    assert [neu.match(a) for a in ["Cr", "In", "Pa", "PS", "RS", "Sc"]] == list(NEU_RAW.values())
    # the Apex names of the parent families match the parents, which no model predicts
    assert neu.match("crack") == "CRACK"
    assert "CRACK" not in neu.class_ids()


# -- class lists, tables, severity ------------------------------------------


def test_apex_class_ids_no_defect_first_then_file_order(apex):
    assert apex.class_ids() == [NO_DEFECT, *APEX_CLASSES]
    assert apex.class_ids(include_no_defect=False) == APEX_CLASSES
    assert [c.id for c in apex.classes] == APEX_CLASSES
    assert NO_DEFECT not in [c.id for c in apex.classes]


def test_neu_class_ids_are_the_six_leaves(neu):
    assert neu.class_ids() == list(NEU_RAW.values())  # no clean images: no NO_DEFECT
    assert neu.class_ids(include_no_defect=False) == list(NEU_RAW.values())
    assert {c.id for c in neu.classes} - set(neu.class_ids()) == {
        "CRACK",
        "SURFACE_PIT",
        "SURFACE_SCRATCH",
    }
    assert neu.get("CRAZING").parent == "CRACK"
    assert neu.ancestors("CRAZING") == ("CRACK",)
    assert neu.ancestors("PITTED_SURFACE") == ("SURFACE_PIT",)
    assert neu.ancestors("SCRATCHES") == ("SURFACE_SCRATCH",)
    assert neu.ancestors("INCLUSION") == ()


def test_class_ids_leaf_rule_with_deeper_tree():
    data = minimal()
    data["classes"].append(
        {
            "id": "HAIRLINE",
            "label": "Hairline crack",
            "description": "",
            "aliases": [],
            "severity_levels": ["critical"],
            "parent": "CRACK",
        }
    )
    data["classes"].append(
        {
            "id": "MICRO",
            "label": "Micro crack",
            "description": "",
            "aliases": [],
            "severity_levels": ["critical"],
            "parent": "HAIRLINE",
        }
    )
    onto = Ontology.from_dict(data)
    assert onto.class_ids() == [NO_DEFECT, "SCRATCH", "MICRO"]
    assert onto.ancestors("MICRO") == ("HAIRLINE", "CRACK")


def test_class_table(apex, neu):
    table = apex.class_table()
    assert table.columns == [
        "id",
        "label",
        "parent",
        "aliases",
        "severity_levels",
        "default_severity",
        "model_class",
    ]
    assert table["id"].to_list() == APEX_CLASSES
    row = table.filter(pl.col("id") == "BURR").row(0, named=True)
    assert row["aliases"] == "burr, burrs, edge burr"
    assert row["severity_levels"] == "minor, major, critical"
    assert row["parent"] is None
    assert table["model_class"].all()
    neu_table = neu.class_table()
    assert neu_table.filter(~pl.col("model_class"))["id"].to_list() == [
        "CRACK",
        "SURFACE_PIT",
        "SURFACE_SCRATCH",
    ]
    assert neu_table.filter(pl.col("id") == "CRAZING")["parent"].item() == "CRACK"


def test_severity_rank_crack_first_and_documented_order(apex, neu):
    rank = apex.severity_rank()
    # max level critical for all but ties broken by default severity, then file order
    assert list(rank) == [
        "CRACK",
        "DIMENSIONAL_OOS",
        "SURFACE_SCRATCH",
        "BURR",
        "SURFACE_PIT",
        NO_DEFECT,
    ]
    assert list(rank.values()) == list(range(6))
    neu_rank = neu.severity_rank()
    assert set(neu_rank) == {c.id for c in neu.classes}
    leaves = sorted(neu.class_ids(), key=neu_rank.__getitem__)
    assert leaves[0] == "CRAZING"


def test_severity_rank_prefers_higher_max_level():
    data = minimal()
    data["classes"].reverse()  # SCRATCH first in the file
    onto = Ontology.from_dict(data)
    assert list(onto.severity_rank()) == ["CRACK", "SCRATCH", NO_DEFECT]


def test_default_severity(apex, neu):
    assert apex.default_severity("CRACK") == "critical"  # explicit
    assert apex.default_severity("SURFACE_SCRATCH") == "minor"  # first level
    assert apex.default_severity("DIMENSIONAL_OOS") == "major"
    assert apex.default_severity(NO_DEFECT) is None
    assert neu.default_severity("CRAZING") == "critical"
    with pytest.raises(KeyError, match="NOPE"):
        apex.default_severity("NOPE")


def test_simulator_severities_are_allowed_levels(apex):
    # the simulator never gives a crack or an OOS part a minor severity
    assert set(plant.SEVERITIES) == set(apex.severity_scale)
    assert "minor" not in apex.get("CRACK").severity_levels
    assert "minor" not in apex.get("DIMENSIONAL_OOS").severity_levels


# -- mapping_frame ------------------------------------------------------------


def test_mapping_frame_series_with_nulls_and_repeats(apex):
    raw = pl.Series(
        "defect_type",
        ["scratch", None, "Edge-Burr", "stain", "scratch", "", "  CRACK", None, "stain"],
    )
    frame = apex.mapping_frame(raw)
    assert frame.columns == ["raw_label", "class_id"]
    assert frame.schema == pl.Schema({"raw_label": pl.String, "class_id": pl.String})
    assert frame["raw_label"].to_list() == raw.to_list()
    assert frame["class_id"].to_list() == [
        "SURFACE_SCRATCH",
        None,
        "BURR",
        None,
        "SURFACE_SCRATCH",
        None,
        "CRACK",
        None,
        None,
    ]


def test_mapping_frame_iterable_categorical_and_empty(apex):
    assert apex.mapping_frame(["pit", "oos"])["class_id"].to_list() == [
        "SURFACE_PIT",
        "DIMENSIONAL_OOS",
    ]
    cat = pl.Series(["pitting", "pitting", "fracture"], dtype=pl.Categorical)
    assert apex.mapping_frame(cat)["class_id"].to_list() == ["SURFACE_PIT", "SURFACE_PIT", "CRACK"]
    empty = apex.mapping_frame([])
    assert empty.height == 0
    assert empty.columns == ["raw_label", "class_id"]
    with pytest.raises(TypeError):
        apex.mapping_frame(pl.Series([1, 2]))


def test_mapping_frame_agrees_with_match(apex, neu):
    raws = [*plant.UNMAPPED_LABELS, *NEU_RAW, "  Out-Of-Spec ", "no_defect", "Cr", "", " "]
    raws += [s for spellings in plant.RAW_LABEL_FAMILIES.values() for s in spellings]
    for onto in (apex, neu):
        frame = onto.mapping_frame(raws)
        assert frame["class_id"].to_list() == [onto.match(r) for r in raws]


def test_mapping_frame_is_vectorised(apex):
    rng = np.random.default_rng(7)
    vocab = np.array(
        ["scratch", "Surface Scratch", "EDGE-BURR", "pitting ", "oil stain", "hairline_crack"]
        + [f"label {i}" for i in range(2000)],
        dtype=object,
    )
    raw = pl.Series("defect_type", vocab[rng.integers(0, vocab.size, 1_000_000)], dtype=pl.String)
    raw = raw.scatter(np.arange(0, 1_000_000, 97), None)
    apex.mapping_frame(raw.head(10))  # warm-up
    start = time.perf_counter()
    frame = apex.mapping_frame(raw)
    elapsed = time.perf_counter() - start
    assert frame.height == 1_000_000
    assert frame["raw_label"].equals(raw.rename("raw_label"), null_equal=True)
    expected = raw.replace_strict(
        ["scratch", "Surface Scratch", "EDGE-BURR", "pitting ", "hairline_crack"],
        ["SURFACE_SCRATCH", "SURFACE_SCRATCH", "BURR", "SURFACE_PIT", "CRACK"],
        default=None,
    )
    assert frame["class_id"].equals(expected.rename("class_id"), null_equal=True)
    assert elapsed < 1.0, f"1M labels took {elapsed:.2f} s"


# -- fingerprint --------------------------------------------------------------


def test_fingerprint_changes_with_content_not_key_order(tmp_path):
    base = minimal()
    fp = Ontology.from_dict(base).fingerprint
    assert len(fp) == 16
    assert int(fp, 16) >= 0

    reordered = {k: base[k] for k in reversed(list(base))}
    reordered["classes"] = [{k: c[k] for k in sorted(c, reverse=True)} for c in base["classes"]]
    assert json.dumps(reordered) != json.dumps(base)
    assert load_ontology(write(tmp_path, reordered)).fingerprint == fp

    explicit_default = copy.deepcopy(base)
    explicit_default["classes"][1]["default_severity"] = "minor"  # same as implicit
    assert Ontology.from_dict(explicit_default).fingerprint == fp

    changes = []
    for mutate in (
        lambda d: d["classes"][0]["aliases"].append("crackle"),
        lambda d: d.update(version="0.1.1"),
        lambda d: d["classes"][1].update(default_severity="major"),
        lambda d: d["classes"][1].update(parent="CRACK"),
        lambda d: d["classes"].reverse(),
        lambda d: d["classes"][0].update(description="a deep crack"),
    ):
        changed = copy.deepcopy(base)
        mutate(changed)
        changes.append(Ontology.from_dict(changed).fingerprint)
    assert fp not in changes
    assert len(set(changes)) == len(changes)


def test_bundled_fingerprints_differ(apex, neu):
    assert apex.fingerprint != neu.fingerprint
    assert load_ontology("apex_defect_taxonomy").fingerprint == apex.fingerprint


# -- loading ------------------------------------------------------------------


def test_available_and_bundled_files_validate():
    names = available_ontologies()
    assert names == ["apex_defect_taxonomy", "neu_steel"]
    folder = Path(__file__).resolve().parents[2] / "apex_assets" / "ontologies"
    for name in names:
        data = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        validate_taxonomy(data, source=name)  # raises if invalid
        onto = load_ontology(name)
        assert onto.name == name == data["ontology"]
        assert onto.version == "1.0.0"
        for c in onto.classes:
            assert c.description.strip(), c.id
            assert c.label.strip(), c.id


def test_load_by_path_str_and_path(tmp_path):
    path = write(tmp_path, minimal())
    by_path = load_ontology(path)
    by_str = load_ontology(str(path))
    assert by_path == by_str
    assert by_path.name == "mini"
    assert by_path.class_ids() == [NO_DEFECT, "CRACK", "SCRATCH"]
    assert by_path.match("Scuff-Mark") == "SCRATCH"


def test_to_dict_round_trip(apex, neu):
    for onto in (apex, neu):
        again = Ontology.from_dict(json.loads(json.dumps(onto.to_dict())))
        assert again == onto
        assert again.fingerprint == onto.fingerprint


def test_load_errors(tmp_path):
    with pytest.raises(OntologyError, match=r"unknown ontology 'nope'.*apex_defect_taxonomy"):
        load_ontology("nope")
    with pytest.raises(OntologyError, match=r"missing\.json"):
        load_ontology(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"ontology": "x",', encoding="utf-8")
    with pytest.raises(OntologyError, match=r"bad\.json: not valid JSON.*line 1"):
        load_ontology(bad)
    listed = write(tmp_path, [1, 2], "list.json")  # type: ignore[arg-type]
    with pytest.raises(OntologyError, match="must be a JSON object"):
        load_ontology(listed)


def test_direct_construction_is_validated():
    crack = DefectClass("CRACK", "Crack", "", ("crack",), ("critical",), None)
    assert Ontology("direct", "1.0.0", (crack,)).match("crack") == "CRACK"
    orphan = DefectClass("CRAZING", "Crazing", "", (), ("critical",), "CRACK")
    with pytest.raises(OntologyError, match="unknown parent 'CRACK'"):
        Ontology("direct", "1.0.0", (orphan,))


# -- validation errors ----------------------------------------------------------


def _cls(cid: str, **kw) -> dict:
    c = {
        "id": cid,
        "label": cid.title(),
        "description": "",
        "aliases": [],
        "severity_levels": ["minor"],
        "parent": None,
    }
    c.update(kw)
    return c


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d.pop("version"), r"missing key\(s\) 'version'"),
        (lambda d: d.pop("classes"), r"missing key\(s\) 'classes'"),
        (lambda d: d["classes"][1].pop("aliases"), r"class 'SCRATCH': missing key\(s\) 'aliases'"),
        (
            lambda d: d["classes"][0].update(defualt_severity="critical"),
            r"class 'CRACK': unknown key\(s\) 'defualt_severity'",
        ),
        (lambda d: d.update(colour="red"), r"unknown key\(s\) 'colour'"),
        (lambda d: d["classes"][1].update(id=""), r"classes\[1\]: empty class id"),
        (lambda d: d["classes"][1].update(id="  "), r"classes\[1\]: empty class id"),
        (lambda d: d["classes"][1].update(id="bad id"), r"class 'bad id': class id must be"),
        (
            lambda d: d["classes"].append(_cls("CRACK", label="Crack 2")),
            r"class 'CRACK': duplicate class id \(also classes\[0\]\)",
        ),
        (
            lambda d: d["classes"][1].update(aliases=["scuff mark", "Scuff-Mark"]),
            r"class 'SCRATCH': duplicate alias 'Scuff-Mark' \(same as 'scuff mark': 'scuff_mark'\)",
        ),
        (
            lambda d: d["classes"][1].update(aliases=["FRACTURE"]),
            r"class 'SCRATCH': alias 'FRACTURE' is also claimed by class 'CRACK'",
        ),
        (
            lambda d: d["classes"][1].update(label="crack"),
            r"class 'SCRATCH': alias 'crack' is also claimed by class 'CRACK'",
        ),
        (lambda d: d["classes"][1].update(parent="PIT"), r"class 'SCRATCH': unknown parent 'PIT'"),
        (
            lambda d: (
                d["classes"][0].update(parent="SCRATCH"),
                d["classes"][1].update(parent="CRACK"),
            ),
            r"parent cycle (CRACK -> SCRATCH -> CRACK|SCRATCH -> CRACK -> SCRATCH)",
        ),
        (
            lambda d: d["classes"][0].update(parent="CRACK"),
            r"class 'CRACK': parent cycle CRACK -> CRACK",
        ),
        (
            lambda d: d["classes"].append(_cls("NO_DEFECT")),
            r"NO_DEFECT is reserved",
        ),
        (
            lambda d: d["classes"].append(_cls("No_Defect")),
            r"NO_DEFECT is reserved",
        ),
        (
            lambda d: d["classes"][1].update(aliases=["no defect"]),
            r"class 'SCRATCH': 'no defect' would match the reserved NO_DEFECT",
        ),
        (
            lambda d: d["classes"][1].update(aliases="scuff mark"),
            r"class 'SCRATCH': 'aliases' must be a list of strings",
        ),
        (
            lambda d: d["classes"][1].update(aliases=["ok", 3]),
            r"class 'SCRATCH': 'aliases' must be a list of strings",
        ),
        (
            lambda d: d["classes"][1].update(aliases=["-"]),
            r"class 'SCRATCH': alias '-' is empty after normalisation",
        ),
        (lambda d: d.update(version="1.0"), r"'version' must be a semantic version.*'1\.0'"),
        (lambda d: d.update(version="v1.0.0"), r"semantic version"),
        (lambda d: d.update(version=1), r"semantic version"),
        (lambda d: d.update(classes=[]), r"'classes' is empty"),
        (lambda d: d.update(classes={}), r"'classes' must be a list"),
        (lambda d: d["classes"].append("CRACK2"), r"classes\[2\]: a class must be an object"),
        (
            lambda d: d["classes"][1].update(severity_levels=["minor", "fatal"]),
            r"class 'SCRATCH': severity level\(s\) \['fatal'\] not in severity_scale",
        ),
        (
            lambda d: d["classes"][1].update(severity_levels=[]),
            r"class 'SCRATCH': 'severity_levels' must be a non-empty list",
        ),
        (
            lambda d: d["classes"][1].update(default_severity="critical"),
            r"class 'SCRATCH': default_severity 'critical' is not one of its severity_levels",
        ),
        (lambda d: d["classes"][1].update(label=""), r"class 'SCRATCH': 'label' must be"),
        (lambda d: d.update(ontology="my ontology"), r"'ontology' must be a name"),
        (lambda d: d.update(no_defect_class="yes"), r"'no_defect_class' must be true or false"),
    ],
)
def test_validation_errors_name_the_offending_entry(tmp_path, mutate, pattern):
    data = minimal()
    mutate(data)
    error = load_error(tmp_path, data)
    assert re.search(pattern, str(error)), str(error)
    with pytest.raises(OntologyError, match=pattern):
        validate_taxonomy(data, source="x")
    assert error.problems and all(p.startswith(str(tmp_path)) for p in error.problems)


def test_validation_reports_every_problem_at_once(tmp_path):
    data = minimal(version="one")
    data["classes"][1].update(parent="GHOST", aliases=["fracture"])
    error = load_error(tmp_path, data)
    assert len(error.problems) == 3
    message = str(error)
    assert "3 problems" in message
    assert "semantic version" in message
    assert "unknown parent 'GHOST'" in message
    assert "alias 'fracture' is also claimed by class 'CRACK'" in message


def test_alias_may_repeat_its_own_id_or_label():
    data = minimal()
    data["classes"][0]["aliases"] = ["crack", "fracture"]  # "crack" = id and label
    assert Ontology.from_dict(data).match("crack") == "CRACK"


def test_custom_severity_scale():
    data = minimal(severity_scale=["cosmetic", "functional", "safety"])
    data["classes"][0]["severity_levels"] = ["safety"]
    data["classes"][1]["severity_levels"] = ["cosmetic", "functional"]
    onto = Ontology.from_dict(data)
    assert onto.severity_scale == ("cosmetic", "functional", "safety")
    assert list(onto.severity_rank()) == ["CRACK", "SCRATCH", NO_DEFECT]
    with pytest.raises(OntologyError, match="repeats a level"):
        validate_taxonomy(minimal(severity_scale=["minor", "minor"]), source="x")
