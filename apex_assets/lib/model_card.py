"""The model card: everything serving needs to preprocess for a model and read its outputs.

Why its own module: the card travels with every model (MLflow run, registry tags, the ONNX
file's metadata, the PyTorch fallback weights), and the serving process reads it without
MLflow or the training code installed; this module needs only the standard library and
:mod:`apex_assets.lib.preprocess`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from apex_assets.lib.preprocess import PreprocessConfig

__all__ = ["ModelCard"]


@dataclass(frozen=True)
class ModelCard:
    """Everything serving needs to rebuild preprocessing and read the model's outputs.

    ``classes`` is the output order of the model (index i of the logits is ``classes[i]``);
    ``preprocess`` is ``PreprocessConfig.to_dict()``; ``ontology`` holds ``name``, ``version``
    and ``fingerprint`` of the taxonomy the classes came from (empty when unknown);
    ``metrics`` are the validation metrics of the selected epoch.
    """

    arch: str
    classes: tuple[str, ...]
    preprocess: dict[str, Any]
    in_chans: int
    ontology: dict[str, str] = field(default_factory=dict)
    no_defect_class: str | None = None
    train_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if not self.created_at:
            object.__setattr__(self, "created_at", datetime.now(UTC).isoformat())
        if len(self.classes) < 2:
            raise ValueError(f"a model card needs at least 2 classes, got {self.classes}")
        if self.no_defect_class is not None and self.no_defect_class not in self.classes:
            raise ValueError(
                f"no_defect_class {self.no_defect_class!r} is not one of {list(self.classes)}"
            )
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists for tuples)."""
        data = asdict(self)
        data["classes"] = list(self.classes)
        return json.loads(json.dumps(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model card key(s) {unknown}")
        values = dict(data)
        values["classes"] = tuple(values.get("classes") or ())
        values["ontology"] = {str(k): str(v) for k, v in (values.get("ontology") or {}).items()}
        values["metrics"] = {str(k): float(v) for k, v in (values.get("metrics") or {}).items()}
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        return cls.from_dict(json.loads(text))

    def preprocess_config(self) -> PreprocessConfig:
        """The exact preprocessing the model was trained with."""
        return PreprocessConfig.from_dict(self.preprocess)
