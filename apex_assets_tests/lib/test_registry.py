"""Model card, registering, tagging, aliasing and loading back from a real MLflow sqlite store."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from apex_assets.lib import registry
from apex_assets.lib.models import create_model, set_threads
from apex_assets.lib.preprocess import PreprocessConfig
from apex_assets.lib.registry import ModelCard, RegistryError
from apex_assets.lib.training import MlflowTarget

CLASSES = ("NO_DEFECT", "SCRATCH", "CRACK")


def _card(**overrides) -> ModelCard:
    values = {
        "arch": "test_resnet",
        "classes": CLASSES,
        "preprocess": PreprocessConfig(image_size=32, channels=1).to_dict(),
        "in_chans": 1,
        "ontology": {"name": "apex_defect_taxonomy", "version": "1.2.0", "fingerprint": "abc123"},
        "no_defect_class": "NO_DEFECT",
        "train_config": {"arch": "test_resnet", "lr": 0.001},
        "metrics": {"val_macro_f1": 0.75},
    }
    values.update(overrides)
    return ModelCard(**values)


def _model(seed: int) -> torch.nn.Module:
    """A tiny timm model whose BatchNorm running stats are not the defaults (so buffers count)."""
    torch.manual_seed(seed)
    model = create_model("test_resnet", len(CLASSES), 1)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 32, 32) * 3 + 1)
    return model.eval()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> MlflowTarget:
    set_threads(1)
    root = tmp_path_factory.mktemp("registry")
    return MlflowTarget(
        tracking_uri=f"sqlite:///{root}/mlflow.db",
        experiment="registry_tests",
        registered_model="registry_test_model",
        artifact_location=str(root / "artifacts"),
    )


@pytest.fixture(scope="module")
def registered(target: MlflowTarget):
    """Two versions of the model: v1 from model A, v2 from model B (each in its own run)."""
    client = MlflowClient(target.tracking_uri)
    before = registry.latest_version(target)
    experiment_id = registry.ensure_experiment(target)
    out = {"before": before, "models": {}, "runs": {}}
    for seed in (1, 2):
        run_id = client.create_run(experiment_id, run_name=f"model_{seed}").info.run_id
        model = _model(seed)
        version = registry.log_and_register(model, _card(), target, run_id)
        out["models"][version] = model
        out["runs"][version] = run_id
    return out


def test_model_card_json_round_trip():
    card = _card()
    again = ModelCard.from_json(card.to_json())
    assert again == card
    assert again.classes == CLASSES
    assert json.loads(card.to_json())["classes"] == list(CLASSES)
    # The card stores mean/std resolved, so serving keeps them even if defaults change.
    assert card.preprocess_config() == PreprocessConfig(32, 1, mean=(0.449,), std=(0.226,))
    assert datetime.fromisoformat(card.created_at).utcoffset().total_seconds() == 0


def test_model_card_rejects_inconsistent_content():
    with pytest.raises(ValueError, match="no_defect_class"):
        _card(no_defect_class="GOOD")
    with pytest.raises(ValueError, match="unknown model card key"):
        ModelCard.from_dict({**_card().to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="at least 2 classes"):
        _card(classes=("ONLY",))


def test_experiment_is_created_with_the_artifact_location(target: MlflowTarget):
    experiment_id = registry.ensure_experiment(target)
    assert registry.ensure_experiment(target) == experiment_id  # idempotent
    exp = MlflowClient(target.tracking_uri).get_experiment(experiment_id)
    assert exp.artifact_location == Path(target.artifact_location).resolve().as_uri()


def test_versions_are_numbered_and_tagged(target: MlflowTarget, registered):
    assert registered["before"] is None  # no registered model yet
    assert sorted(registered["models"]) == ["1", "2"]
    assert registry.latest_version(target) == "2"
    client = MlflowClient(target.tracking_uri)
    mv = client.get_model_version(target.registered_model, "1")
    assert json.loads(mv.tags["classes"]) == list(CLASSES)
    assert json.loads(mv.tags["preprocess"]) == _card().preprocess
    assert mv.tags["ontology_name"] == "apex_defect_taxonomy"
    assert mv.tags["ontology_version"] == "1.2.0"
    assert mv.tags["ontology_fingerprint"] == "abc123"
    assert mv.tags["arch"] == "test_resnet"
    assert mv.tags["run_id"] == registered["runs"]["1"] == mv.run_id
    registry.tag_version(target, "1", {"gate": "passed"})
    assert client.get_model_version(target.registered_model, "1").tags["gate"] == "passed"


def test_card_is_in_the_run_and_the_mlmodel_metadata(target: MlflowTarget, registered, monkeypatch):
    client = MlflowClient(target.tracking_uri)
    run_id = registered["runs"]["2"]
    names = [a.path for a in client.list_artifacts(run_id)]
    assert registry.MODEL_CARD_ARTIFACT in names
    monkeypatch.setenv("MLFLOW_TRACKING_URI", target.tracking_uri)  # restored after the test
    mlflow.set_tracking_uri(target.tracking_uri)
    info = mlflow.models.get_model_info(f"models:/{target.registered_model}/2")
    assert info.metadata["model_card"]["classes"] == list(CLASSES)
    assert info.metadata["model_card"]["ontology"]["version"] == "1.2.0"


def test_loaded_model_predicts_like_the_registered_one(target: MlflowTarget, registered):
    x = torch.randn(3, 1, 32, 32)  # batch 3: the registered graph is batch-dynamic
    for version in ("1", "2"):
        loaded = registry.load_registered_model(target, version=version)
        assert loaded.version == version
        assert loaded.run_id == registered["runs"][version]
        assert not loaded.model.training
        assert loaded.card.classes == CLASSES
        assert loaded.card.preprocess_config().image_size == 32
        with torch.no_grad():
            expected = registered["models"][version](x)
            got = loaded.model(x)
        assert torch.allclose(got, expected, atol=1e-6)
    # The two versions really are different models.
    with torch.no_grad():
        assert not torch.allclose(registered["models"]["1"](x), registered["models"]["2"](x))
    latest = registry.load_registered_model(target)
    assert latest.version == "2"


def test_alias_set_get_and_load(target: MlflowTarget, registered):
    assert registry.alias_version(target, "champion") is None
    registry.set_alias(target, "champion", "1")
    assert registry.alias_version(target, "champion") == "1"
    assert registry.load_registered_model(target, alias="champion").version == "1"
    registry.set_alias(target, "champion", "2")  # moving an alias
    assert registry.alias_version(target, "champion") == "2"
    with pytest.raises(RegistryError, match="not set"):
        registry.load_registered_model(target, alias="shadow")
    with pytest.raises(ValueError, match="either version or alias"):
        registry.load_registered_model(target, version="1", alias="champion")
    with pytest.raises(ValueError, match="invalid alias"):
        registry.set_alias(target, "latest", "1")
    with pytest.raises(RegistryError, match="no version 9"):
        registry.load_registered_model(target, version="9")


def test_unknown_registered_model_has_no_versions(target: MlflowTarget):
    other = MlflowTarget(target.tracking_uri, target.experiment, "never_registered")
    assert registry.latest_version(other) is None
    assert registry.alias_version(other, "champion") is None
    with pytest.raises(RegistryError, match="has no versions"):
        registry.load_registered_model(other)


def test_output_width_must_match_the_card(target: MlflowTarget):
    client = MlflowClient(target.tracking_uri)
    run_id = client.create_run(registry.ensure_experiment(target)).info.run_id
    with pytest.raises(RegistryError, match="3 classes"):
        registry.log_and_register(create_model("test_resnet", 2, 1), _card(), target, run_id)


def test_registry_calls_do_not_leak_the_store_into_the_environment(target, registered):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; subprocesses must not inherit it
    before = os.environ.get("MLFLOW_TRACKING_URI")
    registry.load_registered_model(target, version="1")
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
