"""Defect ontology: taxonomy files, validation and raw-label matching.

A taxonomy file (``apex_assets/ontologies/<name>.json``, or any path) names the
defect classes a model learns and the raw spellings that mean each of them::

    {
      "ontology": "apex_defect_taxonomy",   # name (letters, digits, _ . -)
      "version": "1.0.0",                   # semantic version
      "description": "...",
      "severity_scale": ["minor", "major", "critical"],   # optional, least severe first
      "no_defect_class": true,                            # optional, default true
      "classes": [
        {"id": "CRACK", "label": "Crack", "description": "...",
         "aliases": ["crack", "fracture", "hairline crack"],
         "severity_levels": ["major", "critical"],
         "default_severity": "critical",                  # optional
         "parent": null}
      ]
    }

Rules
-----
Matching
    :func:`normalize_label` folds case and treats runs of blanks, ``_`` and ``-``
    alike (``" Surface-Scratch "`` -> ``surface_scratch``). A raw label matches a
    class when its key equals the key of the class id, its label or one of its
    aliases. Nothing else is tried (no prefixes, no fuzzy matching): an unknown
    label gives ``None`` and is reported downstream, never guessed.
NO_DEFECT
    Implicit, never declared in a file (the id is reserved, as is any alias or
    label whose key is ``no_defect``). With ``no_defect_class`` true (the
    default) it is the first model class and the raw label ``NO_DEFECT`` (any
    case/separators) matches it. A taxonomy whose data has no defect-free images
    (NEU-DET) sets it false, so its models have only the defect classes.
Model classes (:meth:`Ontology.class_ids`)
    The leaves: classes that are no other class's parent, in file order, after
    NO_DEFECT. A parent class is a grouping (``CRAZING`` is a kind of
    ``CRACK``): raw labels may match it and it can be used to roll results up
    (:meth:`Ontology.ancestors`), but no model predicts it.
Severity
    ``severity_levels`` are the levels a class may be given, each from the
    ontology's ``severity_scale`` (default minor < major < critical). The
    default severity of a class is ``default_severity`` or, when absent, the
    first of its ``severity_levels``.
Severity rank (:meth:`Ontology.severity_rank`)
    Most safety-critical first: by the most severe level a class allows, then
    by its default severity (both on the scale, higher first), then by file
    order. NO_DEFECT, when present, comes last.
Fingerprint
    First 16 hex digits of the SHA-256 of the ontology's canonical JSON
    (:meth:`Ontology.to_dict`, keys sorted, defaults resolved): any change of
    content (a class, an alias, the order of classes, a description, the
    version) changes it, key order and an explicit default that equals the
    implicit one do not.
Validation
    :func:`validate_taxonomy` collects every problem it finds and raises one
    :class:`OntologyError` listing them, each naming the file and the class
    (by id, or by position when the id itself is bad) and the alias at fault.
    Unknown keys are errors (a misspelt optional key would otherwise be
    silently ignored). An alias may repeat its own class's id or label
    (harmless); two aliases of one class may not share a key, and no key may
    belong to two classes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl

__all__ = [
    "DEFAULT_SEVERITY_SCALE",
    "NO_DEFECT",
    "DefectClass",
    "Ontology",
    "OntologyError",
    "available_ontologies",
    "load_ontology",
    "normalize_label",
    "normalize_labels_expr",
    "validate_taxonomy",
]

NO_DEFECT = "NO_DEFECT"
DEFAULT_SEVERITY_SCALE: tuple[str, ...] = ("minor", "major", "critical")

_PACKAGE = "apex_assets.ontologies"
_FINGERPRINT_LEN = 16

# Separators: blanks (the Unicode White_Space set, spelt out so that Python's
# ``re`` and the Rust regex engine behind polars agree on every character),
# underscore and hyphen. Literal non-ASCII characters are valid in both engines.
_BLANKS = (
    "\\t\\n\\x0B\\x0C\\r \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)
_SEPARATORS = f"[{_BLANKS}_\\-]+"
_SEPARATORS_RE = re.compile(_SEPARATORS)

_NO_DEFECT_KEY = "no_defect"
_SEMVER_RE = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(?:-((?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
    r"(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_CLASS_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

_TOP_REQUIRED = ("ontology", "version", "classes")
_TOP_OPTIONAL = ("description", "severity_scale", "no_defect_class")
_CLASS_REQUIRED = ("id", "label", "description", "aliases", "severity_levels", "parent")
_CLASS_OPTIONAL = ("default_severity",)


class OntologyError(ValueError):
    """A taxonomy that cannot be used; the message names the file and the entry.

    ``problems`` holds one line per problem found (validation reports them all).
    """

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) or [message]


def normalize_label(raw: str) -> str:
    """Case-, blank- and separator-insensitive key of a label.

    ``"Surface Scratch"``, ``"surface_scratch"``, ``"SURFACE-SCRATCH"`` and
    ``" surface  scratch "`` all give ``"surface_scratch"``. A label made of
    separators only gives ``""``. Same result as :func:`normalize_labels_expr`.
    """
    if not isinstance(raw, str):
        raise TypeError(f"label must be a str, got {type(raw).__name__}")
    return _SEPARATORS_RE.sub("_", raw.lower()).strip("_")


def normalize_labels_expr(expr: pl.Expr) -> pl.Expr:
    """:func:`normalize_label` as a polars expression (nulls stay null)."""
    return expr.str.to_lowercase().str.replace_all(_SEPARATORS, "_").str.strip_chars("_")


@dataclass(frozen=True)
class DefectClass:
    """One class of a taxonomy file (``default_severity`` resolved at load)."""

    id: str
    label: str
    description: str
    aliases: tuple[str, ...]
    severity_levels: tuple[str, ...]
    parent: str | None
    default_severity: str | None = None

    def match_keys(self) -> list[str]:
        """Normalised match keys: id, label, then aliases (duplicates kept)."""
        return [normalize_label(s) for s in (self.id, self.label, *self.aliases)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "description": self.description,
            "aliases": list(self.aliases),
            "severity_levels": list(self.severity_levels),
            "default_severity": self.default_severity or next(iter(self.severity_levels), None),
            "parent": self.parent,
        }


@dataclass(frozen=True)
class Ontology:
    """A validated defect taxonomy (construction validates; see the module doc)."""

    name: str
    version: str
    classes: tuple[DefectClass, ...]
    description: str = ""
    severity_scale: tuple[str, ...] = DEFAULT_SEVERITY_SCALE
    has_no_defect: bool = True
    _index: dict[str, str] = field(init=False, repr=False, compare=False, hash=False)
    _by_id: dict[str, DefectClass] = field(init=False, repr=False, compare=False, hash=False)
    _lookup: pl.DataFrame = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "severity_scale", tuple(self.severity_scale))
        validate_taxonomy(self.to_dict(), source=f"ontology {self.name!r}")
        index: dict[str, str] = {}
        for c in self.classes:
            for key in c.match_keys():
                index[key] = c.id
        if self.has_no_defect:
            index[_NO_DEFECT_KEY] = NO_DEFECT
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_by_id", {c.id: c for c in self.classes})
        lookup = pl.DataFrame(
            {"key": list(index), "class_id": list(index.values())},
            schema={"key": pl.String, "class_id": pl.String},
        )
        object.__setattr__(self, "_lookup", lookup)

    # -- construction -------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> Ontology:
        """Validate ``data`` (a parsed taxonomy file) and build the ontology."""
        validate_taxonomy(data, source=source)
        classes = tuple(
            DefectClass(
                id=c["id"],
                label=c["label"],
                description=c["description"],
                aliases=tuple(c["aliases"]),
                severity_levels=tuple(c["severity_levels"]),
                parent=c["parent"],
                default_severity=c.get("default_severity") or c["severity_levels"][0],
            )
            for c in data["classes"]
        )
        return cls(
            name=data["ontology"],
            version=data["version"],
            classes=classes,
            description=data.get("description", ""),
            severity_scale=tuple(data.get("severity_scale", DEFAULT_SEVERITY_SCALE)),
            has_no_defect=data.get("no_defect_class", True),
        )

    def to_dict(self) -> dict[str, Any]:
        """Taxonomy-file form with every default written out (canonical content)."""
        return {
            "ontology": self.name,
            "version": self.version,
            "description": self.description,
            "severity_scale": list(self.severity_scale),
            "no_defect_class": self.has_no_defect,
            "classes": [c.to_dict() for c in self.classes],
        }

    # -- matching -----------------------------------------------------------

    def match(self, raw: str | None) -> str | None:
        """Class id of a raw label, or None when empty or unknown (never a guess)."""
        if raw is None:
            return None
        key = normalize_label(raw)
        return self._index.get(key) if key else None

    def mapping_frame(self, raw_labels: pl.Series | Iterable[str | None]) -> pl.DataFrame:
        """``raw_label, class_id`` per input label, in input order (class_id null = unmapped).

        Vectorised: each distinct label is normalised once, in polars, and the
        result joined back, so millions of labels take a fraction of a second.
        """
        if isinstance(raw_labels, pl.Series):
            series = raw_labels
            if series.dtype != pl.String:
                if series.dtype in (pl.Null, pl.Categorical) or isinstance(series.dtype, pl.Enum):
                    series = series.cast(pl.String)
                else:
                    raise TypeError(f"raw labels must be strings, got a {series.dtype} Series")
            series = series.rename("raw_label")
        else:
            series = pl.Series("raw_label", list(raw_labels), dtype=pl.String)
        frame = series.to_frame()
        distinct = (
            frame.unique()
            .drop_nulls()
            .with_columns(normalize_labels_expr(pl.col("raw_label")).alias("key"))
            .join(self._lookup, on="key", how="left")
            .select("raw_label", "class_id")
        )
        return frame.join(distinct, on="raw_label", how="left", maintain_order="left")

    # -- class lists and tables --------------------------------------------

    @property
    def leaf_ids(self) -> list[str]:
        """Classes that are no other class's parent, in file order."""
        parents = {c.parent for c in self.classes}
        return [c.id for c in self.classes if c.id not in parents]

    def class_ids(self, *, include_no_defect: bool = True) -> list[str]:
        """The model's class list: NO_DEFECT (if the ontology has it and asked), then the leaves."""
        head = [NO_DEFECT] if include_no_defect and self.has_no_defect else []
        return head + self.leaf_ids

    def get(self, class_id: str) -> DefectClass:
        """The defect class with this id (KeyError naming the ontology if unknown)."""
        try:
            return self._by_id[class_id]
        except KeyError:
            raise KeyError(f"{class_id!r} is not a class of ontology {self.name!r}") from None

    def ancestors(self, class_id: str) -> tuple[str, ...]:
        """Parent, grandparent, ... of a class (empty for a root and for NO_DEFECT)."""
        if class_id == NO_DEFECT and self.has_no_defect:
            return ()
        out: list[str] = []
        parent = self.get(class_id).parent
        while parent is not None:
            out.append(parent)
            parent = self._by_id[parent].parent
        return tuple(out)

    def families(self, model_classes: list[str] | None = None) -> dict[str, list[str]]:
        """Each class id -> the model classes in its family (itself and its descendants).

        Why: gates and reports speak of families ("crack recall" covers CRAZING in the NEU
        taxonomy, whose CRACK is a grouping class no model predicts). Classes whose family
        holds no model class are left out.
        """
        model = model_classes if model_classes is not None else self.class_ids()
        out: dict[str, list[str]] = {}
        for cid in [c.id for c in self.classes] + ([NO_DEFECT] if self.has_no_defect else []):
            members = [m for m in model if m == cid or cid in self.ancestors(m)]
            if members:
                out[cid] = members
        return out

    def class_table(self) -> pl.DataFrame:
        """One row per defect class (file order) for Dagster metadata.

        Columns: id, label, parent, aliases and severity_levels (joined with
        ", "), default_severity, model_class (a leaf, i.e. in :meth:`class_ids`).
        """
        leaves = set(self.leaf_ids)
        return pl.DataFrame(
            {
                "id": [c.id for c in self.classes],
                "label": [c.label for c in self.classes],
                "parent": [c.parent for c in self.classes],
                "aliases": [", ".join(c.aliases) for c in self.classes],
                "severity_levels": [", ".join(c.severity_levels) for c in self.classes],
                "default_severity": [self.default_severity(c.id) for c in self.classes],
                "model_class": [c.id in leaves for c in self.classes],
            },
            schema={
                "id": pl.String,
                "label": pl.String,
                "parent": pl.String,
                "aliases": pl.String,
                "severity_levels": pl.String,
                "default_severity": pl.String,
                "model_class": pl.Boolean,
            },
        )

    # -- severity -----------------------------------------------------------

    def default_severity(self, class_id: str) -> str | None:
        """Default severity of a class; None for NO_DEFECT; KeyError if unknown."""
        if class_id == NO_DEFECT and self.has_no_defect:
            return None
        c = self.get(class_id)
        return c.default_severity or c.severity_levels[0]

    def severity_rank(self) -> dict[str, int]:
        """Class id -> rank (0 = most safety-critical), every class, NO_DEFECT last.

        Order: most severe allowed level, then default severity (higher first),
        then file order. Used to break ties between labels of one image.
        """
        level = {s: i for i, s in enumerate(self.severity_scale)}

        def key(item: tuple[int, DefectClass]) -> tuple[int, int, int]:
            pos, c = item
            top = max(level[s] for s in c.severity_levels)
            return (-top, -level[self.default_severity(c.id)], pos)

        ordered = [c.id for _, c in sorted(enumerate(self.classes), key=key)]
        if self.has_no_defect:
            ordered.append(NO_DEFECT)
        return {cid: rank for rank, cid in enumerate(ordered)}

    # -- identity -----------------------------------------------------------

    @cached_property
    def fingerprint(self) -> str:
        """Short content hash (16 hex digits) of the canonical ontology JSON."""
        canonical = json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:_FINGERPRINT_LEN]


# -- validation -------------------------------------------------------------


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def validate_taxonomy(data: Mapping[str, Any], *, source: str) -> None:
    """Check a parsed taxonomy file; raise one :class:`OntologyError` listing every problem."""
    if not isinstance(data, Mapping):
        raise OntologyError(
            f"{source}: a taxonomy must be a JSON object, got {type(data).__name__}"
        )
    problems: list[str] = []
    add = problems.append

    missing = [k for k in _TOP_REQUIRED if k not in data]
    if missing:
        add(f"missing key(s) {', '.join(map(repr, missing))}")
    unknown = sorted(set(data) - set(_TOP_REQUIRED) - set(_TOP_OPTIONAL))
    if unknown:
        add(f"unknown key(s) {', '.join(map(repr, unknown))}")

    name = data.get("ontology")
    if "ontology" in data and not (isinstance(name, str) and _NAME_RE.fullmatch(name)):
        add(f"'ontology' must be a name (letters, digits, _ . -), got {name!r}")
    version = data.get("version")
    if "version" in data and not (isinstance(version, str) and _SEMVER_RE.fullmatch(version)):
        add(f"'version' must be a semantic version like '1.0.0', got {version!r}")
    if not isinstance(data.get("description", ""), str):
        add("'description' must be a string")
    if not isinstance(data.get("no_defect_class", True), bool):
        add(f"'no_defect_class' must be true or false, got {data['no_defect_class']!r}")

    scale = data.get("severity_scale", list(DEFAULT_SEVERITY_SCALE))
    if not (_is_str_list(scale) and scale and all(s.strip() for s in scale)):
        add(f"'severity_scale' must be a non-empty list of non-empty strings, got {scale!r}")
        scale = list(DEFAULT_SEVERITY_SCALE)
    elif len(set(scale)) != len(scale):
        add(f"'severity_scale' repeats a level: {scale!r}")

    classes = data.get("classes")
    if "classes" in data and not isinstance(classes, list):
        add(f"'classes' must be a list, got {type(classes).__name__}")
        classes = None
    elif isinstance(classes, list) and not classes:
        add("'classes' is empty: a taxonomy needs at least one defect class")
    if classes:
        problems.extend(_class_problems(classes, scale))

    if problems:
        if len(problems) == 1:
            message = f"{source}: {problems[0]}"
        else:
            listing = "".join(f"\n  - {p}" for p in problems)
            message = f"{source}: {len(problems)} problems:{listing}"
        raise OntologyError(message, [f"{source}: {p}" for p in problems])


def _class_problems(classes: list[Any], scale: list[str]) -> list[str]:
    problems: list[str] = []
    add = problems.append
    owner: dict[str, tuple[str, str]] = {}  # key -> (class id, spelling)
    ids: dict[str, int] = {}
    parents: dict[str, str | None] = {}

    for pos, c in enumerate(classes):
        where = f"classes[{pos}]"
        if not isinstance(c, Mapping):
            add(f"{where}: a class must be an object, got {type(c).__name__}")
            continue
        cid = c.get("id")
        if isinstance(cid, str) and cid.strip():
            where = f"class {cid!r}"
        missing = [k for k in _CLASS_REQUIRED if k not in c]
        if missing:
            add(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
        unknown = sorted(set(c) - set(_CLASS_REQUIRED) - set(_CLASS_OPTIONAL))
        if unknown:
            add(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")

        # id
        id_ok = False
        if "id" in c:
            if not isinstance(cid, str) or not cid.strip():
                add(f"{where}: empty class id ({cid!r})")
            elif not _CLASS_ID_RE.fullmatch(cid):
                add(f"{where}: class id must be a letter then letters, digits or _")
            elif normalize_label(cid) == _NO_DEFECT_KEY:
                add(f"{where}: {NO_DEFECT} is reserved (implicit), a file cannot declare it")
            elif cid in ids:
                add(f"{where}: duplicate class id (also classes[{ids[cid]}])")
            else:
                id_ok = True
                ids[cid] = pos
        cid_txt = cid if id_ok else where

        # label and description
        label = c.get("label")
        if "label" in c and not (isinstance(label, str) and label.strip()):
            add(f"{where}: 'label' must be a non-empty string, got {label!r}")
            label = None
        if "description" in c and not isinstance(c["description"], str):
            add(f"{where}: 'description' must be a string")

        # aliases
        aliases = c.get("aliases")
        if "aliases" in c and not _is_str_list(aliases):
            add(f"{where}: 'aliases' must be a list of strings, got {aliases!r}")
            aliases = None
        own_keys: dict[str, str] = {}
        for alias in aliases or []:
            key = normalize_label(alias)
            if not key:
                add(f"{where}: alias {alias!r} is empty after normalisation")
            elif key in own_keys:
                same = "" if alias == own_keys[key] else f" (same as {own_keys[key]!r}: {key!r})"
                add(f"{where}: duplicate alias {alias!r}{same}")
            else:
                own_keys[key] = alias
        self_keys = {}
        for spelling in (cid if id_ok else None, label):
            if isinstance(spelling, str) and normalize_label(spelling):
                self_keys.setdefault(normalize_label(spelling), spelling)
        for key, spelling in {**own_keys, **self_keys}.items():
            if key == _NO_DEFECT_KEY:
                add(f"{where}: {spelling!r} would match the reserved {NO_DEFECT}")
                continue
            if key in owner and owner[key][0] != cid_txt:
                other, other_spelling = owner[key]
                add(
                    f"{where}: alias {spelling!r} is also claimed by class {other!r} "
                    f"(as {other_spelling!r}; key {key!r})"
                )
            else:
                owner.setdefault(key, (cid_txt, spelling))

        # severity
        levels = c.get("severity_levels")
        if "severity_levels" in c:
            if not (_is_str_list(levels) and levels):
                add(
                    f"{where}: 'severity_levels' must be a non-empty list of strings, got {levels!r}"
                )
                levels = None
            else:
                bad = [s for s in levels if s not in scale]
                if bad:
                    add(f"{where}: severity level(s) {bad!r} not in severity_scale {scale!r}")
                if len(set(levels)) != len(levels):
                    add(f"{where}: 'severity_levels' repeats a level: {levels!r}")
        if "default_severity" in c:
            default = c["default_severity"]
            if not isinstance(default, str) or (levels is not None and default not in levels):
                add(f"{where}: default_severity {default!r} is not one of its severity_levels")

        # parent (checked once all ids are known)
        parent = c.get("parent")
        if "parent" in c and parent is not None and not isinstance(parent, str):
            add(f"{where}: 'parent' must be a class id or null, got {parent!r}")
        elif id_ok:
            parents[cid] = parent

    for cid, parent in parents.items():
        if parent is not None and parent not in ids:
            add(f"class {cid!r}: unknown parent {parent!r}")
    reported: set[str] = set()
    for start in parents:
        path = [start]
        node = parents.get(start)
        while node is not None and node in parents and node not in path:
            path.append(node)
            node = parents.get(node)
        if node is not None and node in path:
            cycle = path[path.index(node) :]
            if not reported & set(cycle):
                reported.update(cycle)
                chain = " -> ".join([*cycle, node])
                add(f"class {node!r}: parent cycle {chain}")
    return problems


# -- loading ----------------------------------------------------------------


def available_ontologies() -> list[str]:
    """Names of the bundled taxonomies (``apex_assets/ontologies/*.json``), sorted."""
    folder = resources.files(_PACKAGE)
    return sorted(
        p.name.removesuffix(".json")
        for p in folder.iterdir()
        if p.name.endswith(".json") and p.is_file()
    )


def _parse(text: str, source: str) -> Ontology:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OntologyError(
            f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    return Ontology.from_dict(data, source=source)


def load_ontology(name_or_path: str | Path) -> Ontology:
    """Load a bundled taxonomy by name (``"neu_steel"``) or a taxonomy file by path.

    A plain name (no ``/``, no ``.json``) is looked up among
    :func:`available_ontologies`; anything else is a file path. Every failure
    (no such name or file, bad JSON, invalid content) raises :class:`OntologyError`.
    """
    text_name = str(name_or_path)
    is_name = (
        not isinstance(name_or_path, Path)
        and "/" not in text_name
        and "\\" not in text_name
        and not text_name.endswith(".json")
    )
    if is_name:
        if text_name in available_ontologies():
            entry = resources.files(_PACKAGE) / f"{text_name}.json"
            return _parse(entry.read_text(encoding="utf-8"), f"ontologies/{text_name}.json")
        if not Path(text_name).is_file():
            raise OntologyError(
                f"unknown ontology {text_name!r}: bundled ones are "
                f"{', '.join(available_ontologies())}; or give a file path"
            )
    path = Path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OntologyError(f"{path}: cannot read taxonomy file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise OntologyError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return _parse(text, str(path))
