"""The deployable package of one model version: ``model.onnx`` + ``weights.pt`` in a directory.

Why one function for it: the ``onnx_model`` asset, the tests and the benchmarks must produce
exactly what serving loads (:class:`apex_assets.lib.serving_model.InspectionModel`): the ONNX
graph with the model card and version in its metadata, and the PyTorch fallback weights with
the same card. A second writer would drift.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

from apex_assets.lib.model_card import ModelCard
from apex_assets.lib.serving_model import MODEL_FILE, WEIGHTS_FILE

__all__ = [
    "PACKAGE_META",
    "file_sha256",
    "package_lake_keys",
    "package_lake_prefix",
    "random_model_package",
    "write_model_package",
]

PACKAGE_META = "apex_model.json"


def package_lake_prefix(registered_model: str, version: str) -> str:
    """Lake folder of one registered version's package (``onnx_model`` writes it,
    ``deployed_bento`` reads it)."""
    return f"models/{registered_model}/v{version}"


def package_lake_keys(registered_model: str, version: str) -> dict[str, str]:
    """File name -> lake key of the two files serving needs (model and fallback weights)."""
    prefix = package_lake_prefix(registered_model, version)
    return {name: f"{prefix}/{name}" for name in (MODEL_FILE, WEIGHTS_FILE)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_model_package(
    model: nn.Module,
    card: ModelCard,
    directory: Path,
    *,
    model_version: str,
    registered_model: str = "",
    cam: bool | None = None,
) -> dict[str, str]:
    """Write ``model.onnx``, ``weights.pt`` and ``apex_model.json`` into ``directory``.

    Returns the metadata written to ``apex_model.json`` (version, hashes, outputs). ``cam`` is
    passed to :func:`apex_assets.lib.onnx_export.export_onnx` when it supports CAM outputs.
    """
    import inspect

    import torch

    from apex_assets.lib.onnx_export import export_onnx

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {
        "model_card": card.to_json(),
        "model_version": str(model_version),
        "registered_model": registered_model,
    }
    kwargs = {}
    if "cam" in inspect.signature(export_onnx).parameters:
        kwargs["cam"] = cam
    onnx_path = export_onnx(
        model,
        directory / MODEL_FILE,
        in_chans=card.in_chans,
        image_size=int(card.preprocess["image_size"]),
        metadata=metadata,
        **kwargs,
    )
    weights_path = directory / WEIGHTS_FILE
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(
        {"state_dict": state, "card": card.to_dict(), "model_version": str(model_version)},
        weights_path,
    )
    meta = {
        "model_version": str(model_version),
        "registered_model": registered_model,
        "onnx_sha256": file_sha256(onnx_path),
        "weights_sha256": file_sha256(weights_path),
        "arch": card.arch,
        "classes": ",".join(card.classes),
    }
    (directory / PACKAGE_META).write_text(json.dumps(meta, indent=2))
    return meta


def random_model_package(
    directory: Path,
    *,
    arch: str,
    image_size: int,
    model_version: str,
    ontology_name: str = "apex_defect_taxonomy",
    seed: int = 0,
) -> tuple[nn.Module, ModelCard]:
    """A random-weights, 1-channel package of ``ontology_name``'s classes.

    For tests and latency benchmarks: what serving does with a model does not depend on its
    weights, and nothing can be downloaded here.
    """
    import torch

    from apex_assets.lib.models import create_model
    from apex_assets.lib.ontology import NO_DEFECT, load_ontology
    from apex_assets.lib.preprocess import PreprocessConfig

    torch.manual_seed(seed)
    ontology = load_ontology(ontology_name)
    classes = tuple(ontology.class_ids())
    card = ModelCard(
        arch=arch,
        classes=classes,
        preprocess=PreprocessConfig(image_size=image_size, channels=1).to_dict(),
        in_chans=1,
        ontology={"name": ontology.name, "fingerprint": ontology.fingerprint},
        no_defect_class=NO_DEFECT if NO_DEFECT in classes else None,
    )
    model = create_model(arch, len(classes), 1).eval()
    write_model_package(model, card, directory, model_version=model_version)
    return model, card
