"""A training checkpoint kept in the lake, so a run killed with its disk resumes elsewhere.

Why: :func:`apex_assets.lib.training.train_classifier` resumes from ``last.ckpt`` in a local
folder, but in production one pod runs one training and a killed pod's disk is gone. The
:class:`CheckpointMirror` copies the folder's resume state (``last.ckpt``, ``best.ckpt``,
the fingerprint and MLflow run-id files) to the lake after every epoch, puts it back into an
empty folder before training, and removes it once the run has finished, so the next
scheduled training (same config, new data) starts fresh instead of "resuming" a finished run.

Crash consistency: a kill can land between two uploads, and ``last.ckpt`` and ``best.ckpt``
must come from the same epoch (``last.ckpt`` records which score ``best.ckpt`` holds). So
every epoch's files go under a new generation folder (``<prefix>/000007/last.ckpt``; a file
unchanged since the last epoch keeps its key), and one small manifest
(``<prefix>/checkpoint.json``), written last, names the set. Both lake backends replace an
object atomically, so a reader sees the previous complete set or the new one, never a mix.
Objects of older generations are deleted once the manifest no longer names them.

Layout of the manifest::

    {"format": 1, "generation": 7, "epoch": 7,
     "files": {"last.ckpt": "<prefix>/000007/last.ckpt", "best.ckpt": "<prefix>/000005/best.ckpt",
               ...},
     "obsolete": ["<prefix>/000006/last.ckpt"]}

``obsolete`` lists what the writer deletes right after the manifest; a reader deletes it
again (a kill between the two leaves them behind otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from apex_assets.lib.lake import Lake

__all__ = ["MANIFEST", "CheckpointMirror"]

MANIFEST = "checkpoint.json"
FORMAT = 1


@dataclass
class _State:
    """What the lake holds now (the last manifest read or written)."""

    generation: int = 0
    epoch: int = 0
    files: dict[str, str] = field(default_factory=dict)
    obsolete: list[str] = field(default_factory=list)


class CheckpointMirror:
    """Mirror of one local checkpoint folder under ``prefix`` in ``store``.

    Use: :meth:`restore` before training, :meth:`push` as ``train_classifier``'s
    ``on_checkpoint`` hook, :meth:`finish` after a successful run. One training per prefix
    at a time (the asset keys it by config fingerprint; Dagster runs one ``trained_model``).
    """

    def __init__(self, store: Lake, prefix: str, local_dir: Path) -> None:
        self.store = store
        self.prefix = prefix.strip("/")
        self.local_dir = Path(local_dir)
        self._state = _State()
        # SHA-256 of each local file when it was last uploaded or restored: a file that has
        # not changed since (best.ckpt in an epoch that did not improve) keeps its lake key
        # instead of being uploaded again. A digest, not mtime: an epoch can be shorter than
        # a file system's timestamp resolution.
        self._digests: dict[str, str] = {}
        self._loaded = False

    @property
    def manifest_key(self) -> str:
        return f"{self.prefix}/{MANIFEST}"

    @property
    def epoch(self) -> int:
        """Epochs in the lake checkpoint (0 when the lake holds none)."""
        self._load()
        return self._state.epoch

    # -- reading ---------------------------------------------------------------------------
    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        with tempfile.TemporaryDirectory(prefix="apex-ckpt-") as tmp:
            path = Path(tmp) / MANIFEST
            if not self.store.download_file(self.manifest_key, path):
                return
            raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != FORMAT:
            raise ValueError(
                f"{self.store.uri(self.manifest_key)}: unknown manifest format {raw.get('format')!r}"
            )
        self._state = _State(
            generation=int(raw["generation"]),
            epoch=int(raw["epoch"]),
            files={str(k): str(v) for k, v in raw["files"].items()},
            obsolete=[str(k) for k in raw.get("obsolete", [])],
        )
        if self._state.obsolete:  # left behind when the writer was killed after committing
            self.store.delete(self._state.obsolete)

    def restore(self) -> int | None:
        """Put the lake checkpoint into the local folder when the folder lacks any of its files.

        Returns the number of epochs restored, or None when the lake holds no checkpoint or
        the local folder already has every file (same machine: it is at least as new). A
        restored folder holds exactly the lake's files: anything else there (a completion
        marker) is removed, so training resumes from what the lake says.
        """
        self._load()
        files = self._state.files
        if not files or all((self.local_dir / name).is_file() for name in files):
            return None
        self.local_dir.mkdir(parents=True, exist_ok=True)
        # Everything is downloaded before the folder changes: a failed restore leaves it as
        # it was, never half the lake's files beside half of the old ones.
        parts = {name: self.local_dir / f".{name}.part" for name in files}
        try:
            for name, key in files.items():
                if not self.store.download_file(key, parts[name]):
                    raise FileNotFoundError(
                        f"{self.store.uri(self.manifest_key)} names {key}, which the lake lacks"
                    )
        except BaseException:
            for part in parts.values():
                part.unlink(missing_ok=True)
            raise
        for stale in self.local_dir.iterdir():
            if stale.is_file() and stale.name not in files and stale not in parts.values():
                stale.unlink()
        for name, part in parts.items():
            target = self.local_dir / name
            os.replace(part, target)
            self._digests[name] = _digest(target)
        return self._state.epoch

    # -- writing ---------------------------------------------------------------------------
    def push(self, epoch: int, files: Sequence[Path]) -> None:
        """Copy ``files`` (a consistent set, written after ``epoch`` epochs) to the lake."""
        self._load()
        old = self._state
        generation = old.generation + 1
        keys: dict[str, str] = {}
        digests: dict[str, str] = {}
        unused_new_keys: list[str] = []
        for path in map(Path, files):
            name = path.name
            new_key = f"{self.prefix}/{generation:06d}/{name}"
            digests[name] = _digest(path)
            if name in old.files and self._digests.get(name) == digests[name]:
                keys[name] = old.files[name]
                # an attempt killed before committing this generation may have left it
                unused_new_keys.append(new_key)
                continue
            self.store.upload_file(new_key, path)
            keys[name] = new_key
        kept = set(keys.values())
        obsolete = sorted({k for k in old.files.values() if k not in kept} | set(unused_new_keys))
        new = _State(generation=generation, epoch=int(epoch), files=keys, obsolete=obsolete)
        self._write_manifest(new)
        # only now: after a failed push the lake still holds the previous set
        self._state, self._digests = new, digests
        if obsolete:
            self.store.delete(obsolete)

    def _write_manifest(self, state: _State) -> None:
        body = {
            "format": FORMAT,
            "generation": state.generation,
            "epoch": state.epoch,
            "files": state.files,
            "obsolete": state.obsolete,
        }
        with tempfile.TemporaryDirectory(prefix="apex-ckpt-") as tmp:
            path = Path(tmp) / MANIFEST
            path.write_text(json.dumps(body, indent=1, sort_keys=True), encoding="utf-8")
            self.store.upload_file(self.manifest_key, path)

    def finish(self) -> None:
        """Remove the lake checkpoint after a successful run (the manifest first: from then
        on nothing resumes; a kill before the objects are deleted only leaves garbage)."""
        self._load()
        state = self._state
        keys = sorted(set(state.files.values()) | set(state.obsolete))
        self.store.delete([self.manifest_key])
        if keys:
            self.store.delete(keys)
        self._state = _State()
        self._digests.clear()


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
