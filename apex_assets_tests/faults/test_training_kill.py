"""A training pod is killed mid-way, its disk is lost, and the retried run resumes from the lake.

The tiny plant (rendered at 32 px) is simulated into a fresh database, ingested and curated
in-process. Then ``trained_model`` runs through Dagster's own CLI in a process group of its
own (a pod): as soon as the lake checkpoint holds epoch 2, the group is SIGKILLed (no
cleanup code runs) and the local checkpoint folder is deleted (the next pod's disk is
empty). The retried CLI run must restore the lake checkpoint, resume after the last epoch
the killed one committed, continue its MLflow run, finish every configured epoch exactly
once, register exactly one model version, and leave no checkpoint in the lake: the next
training with this config starts fresh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import mlflow
import pytest

from apex_assets.lib.checkpoint_sync import MANIFEST, CheckpointMirror
from apex_assets.lib.lake import LocalLake
from apex_assets_tests.defs.test_curation_assets import END_DATE, _ingest_everything

BIN = Path(sys.executable).parent
EPOCHS = 8
KILL_AFTER_EPOCH = 2
MATERIALIZE = [
    *(str(BIN / "dagster"), "asset", "materialize"),
    *("-m", "apex_assets.definitions", "--select", "trained_model"),
    # the step in the CLI's own process (no second interpreter loading the definitions)
    *("--config-json", json.dumps({"execution": {"config": {"in_process": {}}}})),
]


@pytest.fixture()
def plant_home(source_db_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """APEX_HOME with the tiny plant curated into its lake; the env the pods run with is set."""
    from apex_assets import cli
    from apex_assets.config import load_settings
    from apex_assets.defs.curation.assets import curation_assets
    from apex_assets.defs.resources import build_resources
    from apex_assets.simulator.plant import simulate_plant

    home = tmp_path / "home"
    for key in [k for k in os.environ if k.startswith(("APEX_", "DAGSTER_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    for key, value in {
        "APEX_HOME": str(home),
        "APEX_SOURCE_DB_URL": source_db_uri,
        "APEX_PARTITION_START_DATE": "2026-01-01",
        "APEX_TRAIN_ARCH": "test_resnet",
        "APEX_TRAIN_IMAGE_SIZE": "32",
        "APEX_TRAIN_EPOCHS": str(EPOCHS),
        "APEX_TRAIN_WARMUP_EPOCHS": "1",
        "APEX_TRAIN_ACCELERATOR": "cpu",
        "APEX_TORCH_THREADS": "1",
        "APEX_DATALOADER_WORKERS": "0",
    }.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    cli.prepare_dagster_home(settings)  # sets DAGSTER_HOME (SQLite storage in APEX_HOME)
    simulate_plant(
        source_db_uri,
        scale="tiny",
        seed=7,
        end_date=END_DATE,
        image_root=settings.image_root,
        render="all",
        image_size=32,
        progress=lambda _m: None,
    )
    _ingest_everything(source_db_uri, settings.lake_dir)
    with dg.instance_for_test() as instance:
        dg.materialize(curation_assets, instance=instance, resources=build_resources(settings))
    return home


@pytest.fixture()
def pods() -> Iterator[list[subprocess.Popen]]:
    """Started pods; any still running when the test ends is killed with its group."""
    pods: list[subprocess.Popen] = []
    yield pods
    for proc in pods:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _start_pod(log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            MATERIALIZE,
            env=dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed as a whole, like a pod
        )


def _committed_epoch(lake_dir: Path) -> tuple[Path, int] | None:
    """(checkpoint prefix folder, epoch) of the lake checkpoint, once its manifest exists."""
    for manifest in (lake_dir / "checkpoints" / "trained_model").glob(f"*/{MANIFEST}"):
        return manifest.parent, int(json.loads(manifest.read_text())["epoch"])
    return None


def _kill_when_checkpointed(proc: subprocess.Popen, lake_dir: Path, log: Path) -> Path:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        found = _committed_epoch(lake_dir)
        if found and found[1] >= KILL_AFTER_EPOCH:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return found[0]
        time.sleep(0.02)
    pytest.fail(f"epoch {KILL_AFTER_EPOCH} never reached the lake (rc {proc.poll()}):\n"
                + log.read_text()[-4000:])  # fmt: skip


@pytest.mark.slow
def test_a_killed_training_pod_resumes_from_the_lake_checkpoint(
    plant_home: Path, pods: list[subprocess.Popen], tmp_path: Path
) -> None:
    from apex_assets.config import load_settings

    settings = load_settings()
    first_log = tmp_path / "pod1.log"
    first = _start_pod(first_log)
    pods.append(first)
    prefix_dir = _kill_when_checkpointed(first, settings.lake_dir, first_log)
    assert first.returncode == -signal.SIGKILL
    out = first_log.read_text()
    started = re.search(r"starting fresh \(no checkpoint\); MLflow run (\w+)", out)
    assert started, out[-4000:]
    killed_run = started.group(1)
    assert f"trained {EPOCHS} epoch(s)" not in out  # it really died mid-way
    # what the killed pod committed last is what the next one must resume from
    found = _committed_epoch(settings.lake_dir)
    assert found and found[0] == prefix_dir
    committed = found[1]
    assert KILL_AFTER_EPOCH <= committed < EPOCHS
    local = settings.home / "checkpoints" / "trained_model" / prefix_dir.name
    assert (local / "last.ckpt").is_file()
    shutil.rmtree(settings.home / "checkpoints")  # the new pod's disk is empty

    second_log = tmp_path / "pod2.log"
    second = _start_pod(second_log)
    pods.append(second)
    assert second.wait(timeout=300) == 0, second_log.read_text()[-4000:]
    out = second_log.read_text()
    assert f"restored the checkpoint after epoch {committed} from " in out
    resumed = re.search(rf"resuming from \S+ after epoch (\d+); MLflow run {killed_run}\b", out)
    assert resumed and int(resumed.group(1)) == committed, out[-4000:]
    trained = [int(m) for m in re.findall(rf"epoch (\d+)/{EPOCHS} train_loss", out)]
    assert trained == list(range(committed + 1, EPOCHS + 1))

    # the killed MLflow run is the one that finished, with the only registered version
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    assert client.get_run(killed_run).info.status == "FINISHED"
    versions = client.search_model_versions(f"name = '{settings.registered_model}'")
    assert [v.run_id for v in versions] == [killed_run]
    ref = LocalLake(settings.lake_dir).read("curated/trained_model.parquet")
    assert ref["run_id"].to_list() == [killed_run] and ref["epochs_run"].to_list() == [EPOCHS]
    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("trained_model"))
    assert event and event.asset_materialization
    history = event.asset_materialization.metadata["history"].value
    epochs = [int(row.split("|")[1]) for row in history.splitlines()[2:] if row.startswith("|")]
    assert epochs == list(range(1, EPOCHS + 1))  # every epoch once, across both pods

    # nothing left to resume: the next training with this config starts fresh
    assert not [p for p in prefix_dir.rglob("*") if p.is_file()]
    fresh = CheckpointMirror(
        LocalLake(settings.lake_dir), f"checkpoints/trained_model/{prefix_dir.name}", tmp_path / "x"
    )
    assert fresh.restore() is None
