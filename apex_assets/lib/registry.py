"""MLflow model registry: the model card, registering a trained model, loading it back.

Why a model card: serving must rebuild the exact preprocessing (size, channels, mean/std) and
read the outputs (class order, ontology version) of whatever version it is given, without the
training code or config at hand (ARCHITECTURE section 7). The card travels three ways, so any
consumer finds it: as ``model_card.json`` in the run, as ``metadata`` in the MLmodel file, and
(the parts a registry UI filters on) as model-version tags.

Why the registered model is a ``torch.export`` program (MLflow's "pt2" format) and not a
pickle: MLflow 3 refuses to unpickle models unless an environment variable opts in, because
unpickling runs arbitrary code. The exported program is data only. Its graph is frozen in eval
mode and cannot be switched with ``.eval()``, so :func:`load_registered_model` rebuilds the
timm architecture named in the card and loads the exported weights into it (the parameter
names are the same): callers get an ordinary ``nn.Module`` that evaluation, embedding and ONNX
export can use like the one training returned.

Why explicit clients: fluent MLflow calls act on a process-global tracking URI. Every function
here builds an ``MlflowClient(target.tracking_uri)`` and sets the global URI before any fluent
call, so two targets in one process (tests, a staging and a production server) never mix.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import timm
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

from apex_assets.lib.model_card import ModelCard
from apex_assets.lib.models import ModelError, create_model

if TYPE_CHECKING:
    from apex_assets.lib.tracking import MlflowTarget

__all__ = [
    "MODEL_CARD_ARTIFACT",
    "LoadedModel",
    "ModelCard",
    "RegistryError",
    "alias_version",
    "artifact_uri",
    "ensure_experiment",
    "latest_version",
    "load_registered_model",
    "log_and_register",
    "set_alias",
    "tag_version",
]

MODEL_CARD_ARTIFACT = "model_card.json"
MODEL_ARTIFACT_NAME = "model"
_ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$")


class RegistryError(LookupError):
    """A registered model, version, alias or card that is missing or unusable."""


@dataclass
class LoadedModel:
    """A registered model loaded for inference: eval-mode module, its card and provenance."""

    model: nn.Module
    card: ModelCard
    version: str
    run_id: str


# -- clients and experiments ----------------------------------------------------------------
def _client(target: MlflowTarget) -> MlflowClient:
    return MlflowClient(tracking_uri=target.tracking_uri, registry_uri=target.tracking_uri)


def artifact_uri(location: str | None) -> str | None:
    """A local path becomes an absolute ``file://`` URI; URIs (s3://, file://) pass as given."""
    if location is None:
        return None
    if "://" in location:
        return location
    return Path(location).expanduser().resolve().as_uri()


def ensure_experiment(target: MlflowTarget) -> str:
    """Id of ``target.experiment``, creating it with ``target.artifact_location`` if absent.

    Why here and not left to MLflow: an experiment created implicitly stores artifacts under
    ``./mlruns`` of whatever directory the process happens to run in, which for a sqlite
    store is nowhere anyone looks. A deleted experiment of that name is restored.
    """
    client = _client(target)
    exp = client.get_experiment_by_name(target.experiment)
    if exp is None:
        try:
            return client.create_experiment(
                target.experiment, artifact_location=artifact_uri(target.artifact_location)
            )
        except MlflowException:
            # Another process created it between our lookup and create.
            exp = client.get_experiment_by_name(target.experiment)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


# -- registering -------------------------------------------------------------------------
def _pip_requirements() -> list[str]:
    # Explicit: MLflow's inference of requirements imports and scans the environment (slow).
    return [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]


def _signature_and_example(card: ModelCard) -> tuple[ModelSignature, np.ndarray]:
    """Batch-dynamic tensor signature and a batch-2 example (batch 1 would export static)."""
    size = int(card.preprocess_config().image_size)
    shape = (-1, card.in_chans, size, size)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), shape)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(card.classes)))]),
    )
    example = np.zeros((2, card.in_chans, size, size), dtype=np.float32)
    return signature, example


def _version_tags(card: ModelCard, run_id: str) -> dict[str, str]:
    return {
        "classes": json.dumps(list(card.classes)),
        "preprocess": json.dumps(card.preprocess, sort_keys=True),
        "ontology_name": str(card.ontology.get("name", "")),
        "ontology_version": str(card.ontology.get("version", "")),
        "ontology_fingerprint": str(card.ontology.get("fingerprint", "")),
        "arch": card.arch,
        "run_id": run_id,
    }


@contextmanager
def _fluent_target(target: MlflowTarget) -> Iterator[None]:
    """Point MLflow's fluent API (``log_model``, ``load_model``) at ``target`` for a block.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` to the environment, so
    every subprocess started later (a demo, a server, a test) would silently inherit this
    store. The variables are put back afterwards; the in-process default stays, and every
    call here sets it first anyway.
    """
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(target.tracking_uri)
    mlflow.set_registry_uri(target.tracking_uri)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_and_register(model: nn.Module, card: ModelCard, target: MlflowTarget, run_id: str) -> str:
    """Log ``model`` to run ``run_id`` and register it as a new version; return the version.

    The model is exported in eval mode (a copy on CPU, the caller's module is not changed)
    with a batch-dynamic input of the card's image size. The card goes into the MLmodel
    metadata, the run (``model_card.json``) and the version tags.
    """
    with _fluent_target(target):
        return _log_and_register(model, card, target, run_id)


def _log_and_register(model: nn.Module, card: ModelCard, target: MlflowTarget, run_id: str) -> str:
    client = _client(target)
    signature, example = _signature_and_example(card)
    export_model = _eval_copy(model)
    with torch.no_grad():
        out = export_model(torch.from_numpy(example))
    if tuple(out.shape) != (2, len(card.classes)):
        raise RegistryError(
            f"model output shape {tuple(out.shape)} does not match the card's "
            f"{len(card.classes)} classes"
        )
    client.log_text(run_id, card.to_json(), MODEL_CARD_ARTIFACT)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        info = _log_model(export_model, card, target, signature, example)
    else:
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            info = _log_model(export_model, card, target, signature, example)
    version = getattr(info, "registered_model_version", None)
    if version is None:
        raise RegistryError(f"MLflow did not register {target.registered_model!r} for {run_id}")
    version = str(version)
    tag_version(target, version, _version_tags(card, run_id))
    return version


def _eval_copy(model: nn.Module) -> nn.Module:
    import copy

    clone = copy.deepcopy(model).to("cpu").float()
    clone.eval()
    return clone


def _log_model(
    model: nn.Module,
    card: ModelCard,
    target: MlflowTarget,
    signature: ModelSignature,
    example: np.ndarray,
) -> Any:
    return mlflow.pytorch.log_model(
        model,
        name=MODEL_ARTIFACT_NAME,
        registered_model_name=target.registered_model,
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(),
        metadata={"model_card": card.to_dict()},
        serialization_format="pt2",
        await_registration_for=60,
    )


# -- versions, tags, aliases ----------------------------------------------------------------
def _check_alias(alias: str) -> None:
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias) or alias.lower() == "latest":
        raise ValueError(
            f"invalid alias {alias!r}: letters, digits, _ and -, starting with a letter or _ "
            "('latest' is reserved by MLflow)"
        )


def _check_version(version: str) -> str:
    text = str(version)
    if not text.isdigit():
        raise ValueError(f"a model version is a positive integer string, got {version!r}")
    return text


def tag_version(target: MlflowTarget, version: str, tags: Mapping[str, str]) -> None:
    """Set (or overwrite) tags on one version of ``target.registered_model``."""
    client = _client(target)
    version = _check_version(version)
    for key, value in tags.items():
        client.set_model_version_tag(target.registered_model, version, str(key), str(value))


def set_alias(target: MlflowTarget, alias: str, version: str) -> None:
    """Point ``alias`` (e.g. ``champion``, ``shadow``) at ``version``; moves it if already set."""
    _check_alias(alias)
    client = _client(target)
    client.set_registered_model_alias(target.registered_model, alias, _check_version(version))


def alias_version(target: MlflowTarget, alias: str) -> str | None:
    """The version ``alias`` points at, or None when the alias (or the model) does not exist."""
    _check_alias(alias)
    client = _client(target)
    try:
        mv = client.get_model_version_by_alias(target.registered_model, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return str(mv.version)


def latest_version(target: MlflowTarget) -> str | None:
    """Highest version number of ``target.registered_model``; None when it has none."""
    client = _client(target)
    name = target.registered_model.replace("'", "\\'")
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    numbers = [int(v.version) for v in versions]
    return str(max(numbers)) if numbers else None


# -- loading ---------------------------------------------------------------------------------
def _read_card(client: MlflowClient, run_id: str) -> ModelCard:
    with tempfile.TemporaryDirectory(prefix="apex-card-") as tmp:
        try:
            path = client.download_artifacts(run_id, MODEL_CARD_ARTIFACT, tmp)
        except (MlflowException, OSError) as exc:
            raise RegistryError(f"run {run_id} has no {MODEL_CARD_ARTIFACT}: {exc}") from exc
        return ModelCard.from_json(Path(path).read_text(encoding="utf-8"))


def _rebuild(exported: nn.Module, card: ModelCard) -> nn.Module:
    """The card's timm architecture with the exported program's weights, in eval mode."""
    try:
        model = create_model(card.arch, len(card.classes), card.in_chans)
    except ModelError as exc:
        raise RegistryError(f"cannot rebuild {card.arch!r} from the model card: {exc}") from exc
    state = exported.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RegistryError(
            f"registered weights do not fit {card.arch!r}: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    model.eval()
    return model


def load_registered_model(
    target: MlflowTarget, *, version: str | None = None, alias: str | None = None
) -> LoadedModel:
    """Load one version of ``target.registered_model`` (by number, by alias, or the latest).

    Give at most one of ``version``/``alias``; neither means the latest version. The model
    comes from ``mlflow.pytorch.load_model("models:/<name>/<version>")`` and is returned as
    the card's timm architecture in eval mode (see the module docstring); the card is read
    from the version's run.
    """
    if version is not None and alias is not None:
        raise ValueError("give either version or alias, not both")
    with _fluent_target(target):
        return _load_registered_model(target, version, alias)


def _load_registered_model(
    target: MlflowTarget, version: str | None, alias: str | None
) -> LoadedModel:
    client = _client(target)
    name = target.registered_model
    if alias is not None:
        resolved = alias_version(target, alias)
        if resolved is None:
            raise RegistryError(f"alias {alias!r} of model {name!r} is not set")
    elif version is not None:
        resolved = _check_version(version)
    else:
        resolved = latest_version(target)
        if resolved is None:
            raise RegistryError(f"registered model {name!r} has no versions")
    try:
        mv = client.get_model_version(name, resolved)
    except MlflowException as exc:
        raise RegistryError(f"model {name!r} has no version {resolved}: {exc}") from exc
    run_id = str(mv.run_id)
    card = _read_card(client, run_id)
    exported = mlflow.pytorch.load_model(f"models:/{name}/{resolved}")
    return LoadedModel(model=_rebuild(exported, card), card=card, version=resolved, run_id=run_id)
