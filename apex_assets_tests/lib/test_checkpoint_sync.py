"""The lake copy of a training checkpoint: mirrored per epoch, restored into an empty disk,
consistent when a kill lands between two uploads, gone once the run finished.

Both lake backends: a folder, and S3 over real HTTP (moto's server).
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from apex_assets.lib.checkpoint_sync import MANIFEST, CheckpointMirror
from apex_assets.lib.lake import Lake, LocalLake, S3Lake
from apex_assets.lib.training import train_classifier
from apex_assets_tests.lib.test_training import CFG, CLASSES, data, target  # noqa: F401

PREFIX = "checkpoints/trained_model/fp1"
_buckets = itertools.count()


@pytest.fixture(params=["local", "s3"])
def lake(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Lake, Callable[[], set[str]]]:
    """(the lake, a function listing every key it holds: files of any kind, not only parquet)."""
    if request.param == "local":
        root = tmp_path / "lake"
        local = LocalLake(root)
        return local, lambda: {
            p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
        }
    import boto3

    endpoint = request.getfixturevalue("s3_endpoint")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = f"ckpt-{next(_buckets)}"
    client.create_bucket(Bucket=bucket)

    def keys() -> set[str]:
        found = client.list_objects_v2(Bucket=bucket, Prefix="plant-a/").get("Contents", [])
        return {o["Key"].removeprefix("plant-a/") for o in found}

    return S3Lake(client, bucket, "plant-a"), keys


def _write(folder: Path, files: dict[str, str]) -> list[Path]:
    """Write ``files`` (name -> text) into ``folder``; every file now there, as a hook gets them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return sorted(p for p in folder.iterdir() if p.is_file())


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_mirror_restore_and_finish(lake, tmp_path: Path) -> None:
    store, keys = lake
    pod_a = tmp_path / "pod_a"
    mirror = CheckpointMirror(store, PREFIX, pod_a)
    assert mirror.restore() is None  # nothing anywhere: train fresh
    files = _write(
        pod_a,
        {
            "last.ckpt": "e1",
            "best.ckpt": "b1",
            "train_fingerprint.txt": "fp",
            "mlflow_run_id.txt": "r",
        },
    )
    mirror.push(1, files)
    # epoch 2 did not improve: best.ckpt is unchanged and keeps its generation-1 object
    mirror.push(2, _write(pod_a, {"last.ckpt": "e2"}))
    assert keys() == {
        f"{PREFIX}/{MANIFEST}",
        f"{PREFIX}/000001/best.ckpt",
        f"{PREFIX}/000001/mlflow_run_id.txt",
        f"{PREFIX}/000001/train_fingerprint.txt",
        f"{PREFIX}/000002/last.ckpt",  # the epoch-1 last.ckpt is deleted
    }

    # a new pod: empty disk except a stale completion marker, which must not survive
    pod_b = tmp_path / "pod_b"
    _write(pod_b, {"train_complete.txt": "old run"})
    again = CheckpointMirror(store, PREFIX, pod_b)
    assert again.restore() == 2 and again.epoch == 2
    assert _contents(pod_b) == {
        "best.ckpt": "b1",
        "last.ckpt": "e2",
        "mlflow_run_id.txt": "r",
        "train_fingerprint.txt": "fp",
    }
    # a disk that still has every file is newer than (or as new as) the lake: left alone
    _write(pod_a, {"last.ckpt": "e3 local"})
    assert CheckpointMirror(store, PREFIX, pod_a).restore() is None
    assert (pod_a / "last.ckpt").read_text() == "e3 local"

    again.finish()
    assert keys() == set()
    empty = tmp_path / "pod_c"
    assert CheckpointMirror(store, PREFIX, empty).restore() is None
    assert not empty.exists()


class Killed(BaseException):
    """The process dies here (a BaseException, like the SystemExit of a SIGTERM handler)."""


class _KilledBeforeCommit:
    """A lake whose process dies (an exception here) when it writes the manifest."""

    def __init__(self, inner: Lake) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def upload_file(self, key: str, path: Path) -> None:
        if key.endswith(MANIFEST):
            raise Killed
        self.inner.upload_file(key, path)


def test_a_kill_between_uploads_leaves_the_previous_epoch(lake, tmp_path: Path) -> None:
    store, keys = lake
    pod_a = tmp_path / "pod_a"
    CheckpointMirror(store, PREFIX, pod_a).push(
        1, _write(pod_a, {"last.ckpt": "e1", "best.ckpt": "b1"})
    )
    # epoch 2 improved: both files changed; the kill lands after their upload, before the
    # manifest: the new objects are in the lake but nothing names them
    files = _write(pod_a, {"last.ckpt": "e2", "best.ckpt": "b2"})
    dying = CheckpointMirror(_KilledBeforeCommit(store), PREFIX, pod_a)  # type: ignore[arg-type]
    with pytest.raises(Killed):
        dying.push(2, files)
    assert f"{PREFIX}/000002/last.ckpt" in keys()

    # the next pod gets epoch 1, whole: never epoch 2's last.ckpt beside epoch 1's best
    pod_b = tmp_path / "pod_b"
    mirror = CheckpointMirror(store, PREFIX, pod_b)
    assert mirror.restore() == 1
    assert _contents(pod_b) == {"best.ckpt": "b1", "last.ckpt": "e1"}
    manifest = tmp_path / "manifest.json"
    assert store.download_file(f"{PREFIX}/{MANIFEST}", manifest)
    assert json.loads(manifest.read_text())["epoch"] == 1

    # it retrains epoch 2, which does not improve this time: generation 2 is written again
    # and the orphaned best.ckpt of the killed attempt is deleted
    mirror.push(2, _write(pod_b, {"last.ckpt": "e2 again"}))
    assert keys() == {
        f"{PREFIX}/{MANIFEST}",
        f"{PREFIX}/000001/best.ckpt",
        f"{PREFIX}/000002/last.ckpt",
    }
    pod_c = tmp_path / "pod_c"
    assert CheckpointMirror(store, PREFIX, pod_c).restore() == 2
    assert _contents(pod_c) == {"best.ckpt": "b1", "last.ckpt": "e2 again"}


def test_a_broken_lake_copy_leaves_the_disk_as_it_was(tmp_path: Path) -> None:
    store = LocalLake(tmp_path / "lake")
    pod_a = tmp_path / "pod_a"
    CheckpointMirror(store, PREFIX, pod_a).push(
        1, _write(pod_a, {"last.ckpt": "e1", "best.ckpt": "b1"})
    )
    # removed by a bucket lifecycle rule, say; best.ckpt is downloaded before it is missed
    store.delete([f"{PREFIX}/000001/last.ckpt"])
    pod_b = tmp_path / "pod_b"
    _write(pod_b, {"train_complete.txt": "old run"})
    with pytest.raises(FileNotFoundError, match=r"000001/last\.ckpt"):
        CheckpointMirror(store, PREFIX, pod_b).restore()
    # no half-restored folder, no partial download left behind
    assert _contents(pod_b) == {"train_complete.txt": "old run"}


def test_a_failed_push_is_retried_whole(tmp_path: Path) -> None:
    """A push that failed half-way must not make the next one trust its uploads."""
    store = LocalLake(tmp_path / "lake")
    pod = tmp_path / "pod"
    mirror = CheckpointMirror(store, PREFIX, pod)
    mirror.push(1, _write(pod, {"last.ckpt": "e1", "best.ckpt": "b1"}))
    real = mirror.store
    mirror.store = _KilledBeforeCommit(real)  # type: ignore[assignment]
    with pytest.raises(Killed):
        mirror.push(2, _write(pod, {"last.ckpt": "e2", "best.ckpt": "b2"}))
    mirror.store = real
    mirror.push(3, _write(pod, {"last.ckpt": "e3"}))  # best.ckpt is still b2: it must be uploaded
    restored = tmp_path / "restored"
    assert CheckpointMirror(store, PREFIX, restored).restore() == 3
    assert _contents(restored) == {"best.ckpt": "b2", "last.ckpt": "e3"}


def test_train_classifier_resumes_from_the_lake_on_an_empty_disk(
    data,  # noqa: F811
    target,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The hook gets each epoch's resume files once written; a kill in epoch 2 plus a wiped
    disk still resumes after epoch 1, in the same MLflow run."""
    root, records = data
    store = LocalLake(tmp_path / "lake")
    disk = tmp_path / "ckpt"
    mirror = CheckpointMirror(store, PREFIX, disk)
    pushed: list[tuple[int, list[str]]] = []

    def push(epoch: int, files: list[Path]) -> None:
        assert (disk / "last.ckpt").is_file()
        pushed.append((epoch, sorted(f.name for f in files)))
        mirror.push(epoch, files)

    def kill_in_epoch_2(message: str) -> None:
        if message.startswith("epoch 2/"):
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        train_classifier(
            records, root, CLASSES, CFG, target=target, checkpoint_dir=disk, register=False,
            progress=kill_in_epoch_2, on_checkpoint=push,
        )  # fmt: skip
    resume_files = ["best.ckpt", "last.ckpt", "mlflow_run_id.txt", "train_fingerprint.txt"]
    assert pushed == [(1, resume_files)]
    killed_run = (disk / "mlflow_run_id.txt").read_text().strip()
    shutil.rmtree(disk)  # the pod is gone with its disk

    pushed.clear()
    mirror = CheckpointMirror(store, PREFIX, disk)
    assert mirror.restore() == 1
    messages: list[str] = []
    result = train_classifier(
        records, root, CLASSES, CFG, target=target, checkpoint_dir=disk, register=False,
        progress=messages.append, on_checkpoint=push,
    )  # fmt: skip
    assert messages[0].startswith("resuming from") and "after epoch 1" in messages[0]
    assert pushed == [(2, resume_files)]
    assert result.resumed_from_epoch == 1 and result.epochs_run == 2
    assert result.history.get_column("epoch").to_list() == [1, 2]
    assert result.run_id == killed_run
    assert MlflowClient(target.tracking_uri).get_run(killed_run).info.status == "FINISHED"
    assert mirror.epoch == 2
