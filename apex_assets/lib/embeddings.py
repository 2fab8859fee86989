"""Image embeddings: penultimate-layer features of a CNN, stored as Parquet, plus a linear probe.

Why embeddings: active learning picks *diverse* uncertain images (distances between
embeddings), and a logistic regression on frozen features is a minute-long baseline that tells
whether a full fine-tune is worth its hours. ResNet-50's pooled penultimate layer (2048-d) is the
default; the architecture is a config value.

Why a fingerprint per extractor: an embedding is only comparable with embeddings of the same
network, weights and preprocessing. Every stored row carries the fingerprint of the extractor
that produced it, and :func:`rows_to_embed` re-embeds a row when its image changed (content
hash) or when the extractor did, so incremental runs embed only what is new and a model change
re-embeds everything.

Storage: one row per image with an ``embedding`` column of Polars type
``Array(Float32, d)``, a fixed-size list that Parquet keeps as one contiguous float buffer and
that comes back to NumPy as a ``[n, d]`` matrix without copying.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from apex_assets.lib.inference import run_batches
from apex_assets.lib.models import create_model, feature_dim, set_threads

if TYPE_CHECKING:
    from apex_assets.lib.datasets import ImageFailure
    from apex_assets.lib.preprocess import PreprocessConfig

DEFAULT_EXTRACTOR_ARCH = "resnet50"
FINGERPRINT_HEX = 16
_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------- extraction


def create_feature_extractor(
    arch: str = DEFAULT_EXTRACTOR_ARCH,
    in_chans: int = 1,
    pretrained_path: Path | str | None = None,
) -> nn.Module:
    """A timm backbone without classifier (``num_classes=0``: pooled penultimate features),
    in eval mode."""
    return create_model(arch, 0, in_chans, pretrained_path).eval()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def extractor_fingerprint(
    arch: str, preprocess: PreprocessConfig, pretrained_path: Path | str | None
) -> str:
    """16-hex sha256 of the architecture, the preprocessing and the weights file's content.

    The weights are identified by the sha256 of the file's bytes (not its path: a retrained
    file at the same path must re-embed), or ``"scratch"`` for random initialisation.
    """
    if pretrained_path is None:
        weights = "scratch"
    else:
        path = Path(pretrained_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        weights = _file_sha256(path)
    payload = json.dumps(
        {"arch": arch, "preprocess": preprocess.to_dict(), "weights": weights},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:FINGERPRINT_HEX]


@dataclass
class EmbeddingResult:
    """Feature vectors of a run: ``vectors[i]`` belongs to original row ``indices[i]``;
    unreadable images are absent and listed in ``failures``."""

    indices: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [n, d]
    failures: list[ImageFailure]
    images_per_s: float


def _flatten_features(features: torch.Tensor) -> torch.Tensor:
    # num_classes=0 models already pool to [N, d]; flatten guards backbones that return [N, d, 1, 1].
    return features.float().flatten(1)


def extract_embeddings(
    model: nn.Module,
    loader: DataLoader,
    *,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 10.0,
) -> EmbeddingResult:
    """Feature vectors for every readable image of ``loader`` (see ``inference.run_batches``
    for modes, threads and progress). With no readable image, ``vectors`` is ``[0, d]`` with
    ``d`` from :func:`feature_dim` when the model exposes it."""
    run = run_batches(
        model,
        loader,
        _flatten_features,
        threads=threads,
        progress=progress,
        progress_every_s=progress_every_s,
    )
    vectors = run.outputs.astype(np.float32, copy=False)
    if len(vectors) == 0:
        try:
            width = feature_dim(model)
        except ValueError:
            width = 0
        vectors = np.zeros((0, width), dtype=np.float32)
    return EmbeddingResult(
        indices=run.indices,
        vectors=vectors,
        failures=run.failures,
        images_per_s=run.images_per_s,
    )


def embed_image_paths(
    image_root: Path,
    image_paths: Sequence[str],
    *,
    arch: str,
    preprocess: PreprocessConfig,
    weights: Path | str | None,
    batch_size: int,
    workers: int,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> EmbeddingResult:
    """Embed images named by their database paths (relative to ``image_root``) with one
    extractor: the image_embeddings asset and the active-learning queue share this, so both
    produce vectors of the same fingerprint."""
    from apex_assets.lib.datasets import InspectionImageDataset, make_loader

    model = create_feature_extractor(arch, in_chans=preprocess.channels, pretrained_path=weights)
    dataset = InspectionImageDataset(image_root, list(image_paths), None, preprocess)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    return extract_embeddings(model, loader, threads=threads, progress=progress)


# --------------------------------------------------------------------------- storage


def embeddings_frame(
    image_ids: Sequence[str],
    content_hashes: Sequence[str | None] | None,
    vectors: np.ndarray,
    fingerprint: str,
) -> pl.DataFrame:
    """The stored form: ``image_id``, ``content_hash`` (nullable), ``extractor``, ``embedding``.

    ``embedding`` is ``Array(Float32, d)``; ``content_hashes=None`` stores nulls (the image's
    content is then identified by ``image_id`` alone).
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be a [n, d] matrix, got shape {vectors.shape}")
    n, d = vectors.shape
    if d < 1:
        raise ValueError("vectors must have at least one column")
    if len(image_ids) != n:
        raise ValueError(f"{len(image_ids)} image_ids but {n} vectors")
    if content_hashes is not None and len(content_hashes) != n:
        raise ValueError(f"{len(content_hashes)} content_hashes but {n} vectors")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinite values")
    hashes = [None] * n if content_hashes is None else list(content_hashes)
    return pl.DataFrame(
        [
            pl.Series("image_id", list(image_ids), dtype=pl.String),
            pl.Series("content_hash", hashes, dtype=pl.String),
            pl.Series("extractor", [fingerprint] * n, dtype=pl.String),
            pl.Series(
                "embedding",
                np.ascontiguousarray(vectors, dtype=np.float32),
                dtype=pl.Array(pl.Float32, d),
            ),
        ]
    )


def embedding_matrix(frame: pl.DataFrame) -> np.ndarray:
    """The ``embedding`` column as a float32 ``[n, d]`` matrix.

    Zero-copy when the column is one contiguous chunk without nulls; the result may then be
    read-only (it shares Arrow's buffer), so copy before modifying it in place.
    """
    column = frame.get_column("embedding")
    dtype = column.dtype
    if not isinstance(dtype, pl.Array):
        raise ValueError(f"embedding column must be a Polars Array, got {dtype}")
    if column.null_count():
        raise ValueError(f"{column.null_count()} rows have a null embedding")
    if len(dtype.shape) != 1:
        raise ValueError(f"embedding column must be a 1-d Array, got {dtype}")
    width = int(dtype.size)
    if dtype.inner != pl.Float32:
        column = column.cast(pl.Array(pl.Float32, width))
    if len(column) == 0:
        return np.zeros((0, width), dtype=np.float32)
    if column.n_chunks() > 1:
        column = column.rechunk()
    matrix = column.to_numpy()
    return matrix.reshape(len(column), width).astype(np.float32, copy=False)


def split_xy(
    joined: pl.DataFrame, split: str, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Embedding matrix and class indices (into ``classes``) of one split's rows of a frame
    with ``split``, ``label`` and ``embedding`` columns: the inputs of a probe or experiment."""
    rows = joined.filter(pl.col("split") == split)
    index = {str(c): i for i, c in enumerate(classes)}
    unknown = set(rows["label"].unique()) - set(index)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not among the classes {list(classes)}")
    return embedding_matrix(rows), np.asarray([index[c] for c in rows["label"]], dtype=np.int64)


def rows_to_embed(
    candidates: pl.DataFrame, existing: pl.DataFrame | None, fingerprint: str
) -> pl.DataFrame:
    """The candidate rows that have no stored embedding from this extractor for their content.

    A candidate (``image_id``, ``content_hash``) is skipped only when ``existing`` holds a row
    with the same ``image_id``, the same ``content_hash`` (two nulls count as equal: nothing
    says the image changed) and ``extractor == fingerprint``. So new images, changed images and
    everything after an extractor change are (re-)embedded. Candidate order and columns are
    kept.
    """
    missing = {"image_id", "content_hash"} - set(candidates.columns)
    if missing:
        raise ValueError(f"candidates lack column(s) {sorted(missing)}")
    if existing is None or existing.height == 0:
        return candidates
    missing = {"image_id", "content_hash", "extractor"} - set(existing.columns)
    if missing:
        raise ValueError(f"existing embeddings lack column(s) {sorted(missing)}")
    done = (
        existing.lazy()
        .filter(pl.col("extractor") == fingerprint)
        .select(pl.col("image_id").cast(pl.String), pl.col("content_hash").cast(pl.String))
        .unique()
        .collect()
    )
    probe = candidates.with_columns(
        pl.col("image_id").cast(pl.String).alias("__id"),
        pl.col("content_hash").cast(pl.String).alias("__hash"),
    )
    kept = probe.join(
        done.rename({"image_id": "__id", "content_hash": "__hash"}),
        on=["__id", "__hash"],
        how="anti",
        nulls_equal=True,
        maintain_order="left",
    )
    return kept.drop("__id", "__hash")


def images_by_partition(
    images: pl.DataFrame, partition_keys: Sequence[str], tz: str
) -> dict[str, pl.DataFrame]:
    """The images of each daily partition key (``YYYY-MM-DD``, capture date in ``tz``).

    Every key is present in the result, with an empty frame when no image was captured that day.
    """
    dated = images.with_columns(
        pl.col("capture_timestamp").dt.convert_time_zone(tz).dt.date().alias("__day")
    )
    wanted = {dt.date.fromisoformat(k): k for k in partition_keys}
    out = {k: dated.head(0) for k in partition_keys}
    for (day,), rows in dated.filter(pl.col("__day").is_in(list(wanted))).group_by(["__day"]):
        out[wanted[day]] = rows
    return {k: v.drop("__day") for k, v in out.items()}


def merge_partition(
    stored: pl.DataFrame | None, new: pl.DataFrame | None, current_ids: pl.Series
) -> pl.DataFrame | None:
    """A partition's embeddings after a run, or None when the stored file is still right.

    Stored rows of images no longer in the partition (``current_ids``) are dropped, and
    stored rows of re-embedded images are replaced by the ``new`` ones.
    """
    if stored is None:
        return new
    kept = stored.filter(pl.col("image_id").is_in(current_ids.implode()))
    if new is not None:
        kept = kept.join(new.select("image_id"), on="image_id", how="anti")
        return pl.concat([kept, new])
    return kept if kept.height != stored.height else None


# --------------------------------------------------------------------------- linear probe


@dataclass(frozen=True)
class ProbeResult:
    """Accuracy of a logistic regression on frozen embeddings.

    ``per_class_recall`` is NaN for a class without evaluation images.
    """

    accuracy: float
    per_class_recall: dict[str, float]
    train_images: int
    eval_images: int
    epochs: int


@dataclass(frozen=True, eq=False)
class LinearProbe:
    """A fitted multinomial logistic regression on standardized features.

    Why a separate object (not just an accuracy): active learning needs the probe's class
    probabilities on the *unlabelled* pool to choose what to label next, and the experiment
    refits it at every budget. Plain NumPy arrays, so predicting needs no torch and the probe
    pickles small. ``eq=False``: arrays do not compare with ``==``; compare the fields.
    """

    classes: tuple[str, ...]
    mean: np.ndarray  # float64 [d], train mean
    std: np.ndarray  # float64 [d], train std (1 where a feature is constant)
    weight: np.ndarray  # float32 [d, k]
    bias: np.ndarray  # float32 [k]
    epochs: int
    train_images: int

    def standardize(self, x: np.ndarray) -> np.ndarray:
        """``x`` in the probe's standardized feature space (float32), as in training."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"x must be [n, {len(self.mean)}], got shape {x.shape}")
        return ((x - self.mean) / self.std).astype(np.float32)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Float32 ``[n, k]`` class scores."""
        return self.standardize(x) @ self.weight + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Float64 ``[n, k]`` softmax probabilities (rows sum to 1), columns in ``classes``."""
        z = self.logits(x).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Int64 ``[n]`` index of the top class (ties -> lowest index)."""
        return self.logits(x).argmax(axis=1).astype(np.int64)


def _check_xy(x: np.ndarray, y: np.ndarray, k: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name}_x must be a non-empty [n, d] matrix, got shape {x.shape}")
    if y.shape != (len(x),):
        raise ValueError(f"{name}_y must have shape ({len(x)},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}_y must hold integer class indices, got {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"{name}_y has class indices outside 0..{k - 1}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}_x contains NaN or infinite values")
    return x, y.astype(np.int64)


def _check_probe_args(classes: Sequence[str], epochs: int) -> int:
    k = len(classes)
    if k < 2:
        raise ValueError(f"a probe needs at least 2 classes, got {k}")
    if len(set(map(str, classes))) != k:
        raise ValueError(f"class names must be unique, got {list(classes)}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return k


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    classes: Sequence[str],
    *,
    epochs: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
    threads: int = 1,
) -> LinearProbe:
    """Multinomial logistic regression on standardized features.

    Features are standardized with the *train* mean/std (a constant feature gets std 1, so it
    becomes 0 instead of NaN). The model is trained full-batch with Adam for ``epochs`` steps
    on the cross-entropy plus ``weight_decay / 2 * ||W||^2`` (the bias is not penalised).
    Initial weights come from ``seed``; with one thread the result is bit-for-bit repeatable.
    A class without training images is allowed (it is then rarely predicted).
    """
    k = _check_probe_args(classes, epochs)
    train_x, train_y = _check_xy(train_x, train_y, k, "train")
    mean = train_x.mean(axis=0, dtype=np.float64)
    std = train_x.std(axis=0, dtype=np.float64)
    std[std < 1e-12] = 1.0
    xs = torch.from_numpy(((train_x - mean) / std).astype(np.float32))
    ys = torch.from_numpy(train_y)

    previous_threads = torch.get_num_threads()
    try:
        set_threads(threads)
        generator = torch.Generator().manual_seed(seed)
        d = xs.shape[1]
        weight = (torch.randn((d, k), generator=generator) * 0.01).requires_grad_()
        bias = torch.zeros(k, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        for _ in range(epochs):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(xs @ weight + bias, ys)
            if weight_decay:
                loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
    finally:
        set_threads(previous_threads)
    return LinearProbe(
        classes=tuple(str(c) for c in classes),
        mean=mean,
        std=std,
        weight=weight.detach().numpy().copy(),
        bias=bias.detach().numpy().copy(),
        epochs=epochs,
        train_images=len(train_x),
    )


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    classes: Sequence[str],
    *,
    epochs: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
    threads: int = 1,
) -> ProbeResult:
    """Accuracy and per-class recall on ``eval`` of :func:`fit_linear_probe` fitted on
    ``train`` (same arguments, same training)."""
    k = _check_probe_args(classes, epochs)
    train_x, train_y = _check_xy(train_x, train_y, k, "train")
    eval_x, eval_y = _check_xy(eval_x, eval_y, k, "eval")
    if train_x.shape[1] != eval_x.shape[1]:
        raise ValueError(f"train has {train_x.shape[1]} features but eval has {eval_x.shape[1]}")
    probe = fit_linear_probe(
        train_x,
        train_y,
        classes,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        threads=threads,
    )
    correct = probe.predict(eval_x) == eval_y
    recall: dict[str, float] = {}
    for c, name in enumerate(classes):
        mask = eval_y == c
        recall[str(name)] = float(correct[mask].mean()) if mask.any() else float("nan")
    return ProbeResult(
        accuracy=float(correct.mean()),
        per_class_recall=recall,
        train_images=len(train_x),
        eval_images=len(eval_x),
        epochs=epochs,
    )
