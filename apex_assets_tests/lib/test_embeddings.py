"""Embeddings (apex_assets.lib.embeddings): extraction with tiny timm backbones over real PNGs,
Parquet round trip, incremental selection, and the linear-probe baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from apex_assets.lib.datasets import InspectionImageDataset, make_loader
from apex_assets.lib.embeddings import (
    create_feature_extractor,
    embedding_matrix,
    embeddings_frame,
    extract_embeddings,
    extractor_fingerprint,
    linear_probe,
    rows_to_embed,
)
from apex_assets.lib.models import feature_dim
from apex_assets.lib.preprocess import PreprocessConfig, preprocess_image

CFG = PreprocessConfig(image_size=32, channels=1)


def write_images(root: Path, n: int, *, corrupt: tuple[int, ...] = ()) -> list[str]:
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        rel = f"img_{i:03d}.png"
        if i in corrupt:
            (root / rel).write_bytes(b"\x89PNG truncated")
        else:
            pixels = rng.integers(0, 256, (40, 40), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / rel)
        paths.append(rel)
    return paths


def loader_for(root: Path, paths: list[str], cfg: PreprocessConfig = CFG, batch_size: int = 2):
    dataset = InspectionImageDataset(root, paths, None, cfg)
    return make_loader(dataset, batch_size=batch_size, shuffle=False)


# --------------------------------------------------------------------------- extraction


def test_resnet10t_embeddings_width_determinism_and_failures(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_feature_extractor("resnet10t", in_chans=1)
    assert not model.training
    assert feature_dim(model) == 512
    paths = write_images(tmp_path, 5, corrupt=(2,))

    first = extract_embeddings(model, loader_for(tmp_path, paths), threads=1)
    second = extract_embeddings(model, loader_for(tmp_path, paths, batch_size=3), threads=1)

    assert first.vectors.dtype == np.float32
    assert first.vectors.shape == (4, 512)
    assert first.indices.tolist() == [0, 1, 3, 4]
    assert [f.index for f in first.failures] == [2]
    assert np.isfinite(first.vectors).all()
    # Deterministic, and independent of how rows are batched.
    assert second.indices.tolist() == first.indices.tolist()
    np.testing.assert_allclose(second.vectors, first.vectors, rtol=1e-5, atol=1e-5)
    # Rows are different images, so their vectors differ.
    assert not np.allclose(first.vectors[0], first.vectors[1])

    # Same numbers as the backbone called directly on the serving preprocessing.
    with Image.open(tmp_path / paths[4]) as img:
        x = torch.from_numpy(preprocess_image(img, CFG))[None]
    with torch.inference_mode():
        direct = model(x).numpy()[0]
    np.testing.assert_allclose(first.vectors[3], direct, rtol=1e-4, atol=1e-5)


def test_default_extractor_is_resnet50_2048(tmp_path: Path) -> None:
    model = create_feature_extractor()  # resnet50, grayscale, from scratch
    paths = write_images(tmp_path, 1)
    result = extract_embeddings(model, loader_for(tmp_path, paths, batch_size=1))
    assert feature_dim(model) == 2048
    assert result.vectors.shape == (1, 2048)
    assert result.indices.tolist() == [0]


def test_extract_with_no_readable_image_has_feature_width(tmp_path: Path) -> None:
    model = create_feature_extractor("test_resnet", in_chans=1)
    paths = write_images(tmp_path, 2, corrupt=(0, 1))
    result = extract_embeddings(model, loader_for(tmp_path, paths))
    assert result.vectors.shape == (0, feature_dim(model))
    assert len(result.failures) == 2


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_arch_preprocess_and_weight_content(tmp_path: Path) -> None:
    base = extractor_fingerprint("resnet50", CFG, None)
    assert len(base) == 16
    int(base, 16)  # hex
    assert extractor_fingerprint("resnet50", PreprocessConfig(image_size=32, channels=1), None) == (
        base
    )
    assert extractor_fingerprint("resnet18", CFG, None) != base
    assert extractor_fingerprint("resnet50", PreprocessConfig(image_size=64), None) != base
    assert extractor_fingerprint(
        "resnet50", PreprocessConfig(32, interpolation="bicubic"), None
    ) != (base)

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights v1")
    with_file = extractor_fingerprint("resnet50", CFG, weights)
    assert with_file != base
    copy = tmp_path / "elsewhere.safetensors"
    copy.write_bytes(b"weights v1")
    assert extractor_fingerprint("resnet50", CFG, str(copy)) == with_file  # content, not path
    weights.write_bytes(b"weights v2")
    assert extractor_fingerprint("resnet50", CFG, weights) != with_file
    with pytest.raises(FileNotFoundError):
        extractor_fingerprint("resnet50", CFG, tmp_path / "missing.pth")


# --------------------------------------------------------------------------- storage


def test_frame_parquet_round_trip(tmp_path: Path) -> None:
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    frame = embeddings_frame(["a", "b", "c"], ["h1", None, "h3"], vectors, "fp1")
    assert frame.schema == pl.Schema(
        {
            "image_id": pl.String,
            "content_hash": pl.String,
            "extractor": pl.String,
            "embedding": pl.Array(pl.Float32, 4),
        }
    )
    assert frame["content_hash"].to_list() == ["h1", None, "h3"]
    assert frame["extractor"].to_list() == ["fp1"] * 3

    path = tmp_path / "emb.parquet"
    frame.write_parquet(path)
    back = pl.read_parquet(path)
    assert back.schema == frame.schema
    matrix = embedding_matrix(back)
    assert matrix.dtype == np.float32
    assert matrix.shape == (3, 4)
    np.testing.assert_array_equal(matrix, vectors)

    # Two row groups concatenated still give one matrix in row order.
    both = pl.concat([back, back], rechunk=False)
    np.testing.assert_array_equal(embedding_matrix(both), np.vstack([vectors, vectors]))
    assert embedding_matrix(back.head(0)).shape == (0, 4)


def test_frame_without_hashes_and_bad_input() -> None:
    frame = embeddings_frame(["x"], None, np.ones((1, 2), dtype=np.float64), "fp")
    assert frame["content_hash"].to_list() == [None]
    assert frame.schema["embedding"] == pl.Array(pl.Float32, 2)
    with pytest.raises(ValueError, match="image_ids"):
        embeddings_frame(["x", "y"], None, np.ones((1, 2)), "fp")
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        embeddings_frame(["x"], None, np.ones(2), "fp")
    with pytest.raises(ValueError, match="NaN"):
        embeddings_frame(["x"], None, np.array([[np.nan, 1.0]]), "fp")
    with pytest.raises(ValueError, match="Array"):
        embedding_matrix(pl.DataFrame({"embedding": [[1.0, 2.0]]}))


def test_rows_to_embed_only_new_or_changed() -> None:
    existing = embeddings_frame(
        ["a", "b", "c", "d"],
        ["h1", "h2", None, "h4"],
        np.zeros((4, 2), dtype=np.float32),
        "fp",
    )
    candidates = pl.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e"],
            "content_hash": ["h1", "h2-new", None, "h4", "h5"],
            "image_path": ["pa", "pb", "pc", "pd", "pe"],
        }
    )
    todo = rows_to_embed(candidates, existing, "fp")
    # a, c (null == null) and d are embedded already; b changed; e is new.
    assert todo["image_id"].to_list() == ["b", "e"]
    assert todo.columns == candidates.columns
    assert todo["image_path"].to_list() == ["pb", "pe"]

    # Under another extractor nothing counts as embedded.
    assert rows_to_embed(candidates, existing, "fp-other")["image_id"].to_list() == list("abcde")
    # No store yet: everything.
    assert rows_to_embed(candidates, None, "fp").height == 5
    assert rows_to_embed(candidates, existing.head(0), "fp").height == 5
    # Mixed store: only rows from the matching extractor count.
    mixed = pl.concat(
        [existing, embeddings_frame(["e"], ["h5"], np.zeros((1, 2), np.float32), "fp-other")]
    )
    assert rows_to_embed(candidates, mixed, "fp")["image_id"].to_list() == ["b", "e"]
    assert rows_to_embed(candidates, mixed, "fp-other")["image_id"].to_list() == list("abcd")


# --------------------------------------------------------------------------- linear probe


def gaussian_clusters(n: int, k: int, d: int, *, spread: float, seed: int):
    centers = np.random.default_rng(100).normal(0.0, 1.0, (k, d)) * 6.0
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = centers[y] + rng.normal(0.0, spread, (n, d))
    return x.astype(np.float32), y


def test_linear_probe_separable_clusters() -> None:
    train_x, train_y = gaussian_clusters(120, 3, 16, spread=1.0, seed=1)
    eval_x, eval_y = gaussian_clusters(60, 3, 16, spread=1.0, seed=2)
    # Large, shifted feature scale: standardization must make this irrelevant.
    train_x, eval_x = train_x * 1000 + 50, eval_x * 1000 + 50
    classes = ["NO_DEFECT", "CRACK", "BURR"]
    result = linear_probe(train_x, train_y, eval_x, eval_y, classes, epochs=200)
    assert result.accuracy == 1.0
    assert result.per_class_recall == {"NO_DEFECT": 1.0, "CRACK": 1.0, "BURR": 1.0}
    assert (result.train_images, result.eval_images, result.epochs) == (120, 60, 200)

    again = linear_probe(train_x, train_y, eval_x, eval_y, classes, epochs=200)
    assert again == result


def test_linear_probe_random_labels_is_chance_and_deterministic() -> None:
    rng = np.random.default_rng(7)
    train_x = rng.normal(size=(400, 32)).astype(np.float32)
    train_y = rng.integers(0, 4, 400)
    eval_x = rng.normal(size=(2000, 32)).astype(np.float32)
    eval_y = rng.integers(0, 4, 2000)
    classes = ["a", "b", "c", "d"]
    result = linear_probe(train_x, train_y, eval_x, eval_y, classes, epochs=150, seed=3)
    # Chance is 0.25; the binomial std over 2000 eval rows is about 0.01.
    assert abs(result.accuracy - 0.25) < 0.05
    assert linear_probe(train_x, train_y, eval_x, eval_y, classes, epochs=150, seed=3) == result


def test_linear_probe_recall_counts_and_validation() -> None:
    train_x, train_y = gaussian_clusters(60, 3, 4, spread=0.5, seed=1)
    eval_x, eval_y = gaussian_clusters(6, 3, 4, spread=0.5, seed=2)
    keep = eval_y != 2  # no eval image of class 2
    result = linear_probe(train_x, train_y, eval_x[keep], eval_y[keep], ["p", "q", "r"], epochs=50)
    assert result.eval_images == 4
    assert result.per_class_recall["p"] == 1.0
    assert np.isnan(result.per_class_recall["r"])
    with pytest.raises(ValueError, match="outside"):
        linear_probe(train_x, train_y + 5, eval_x, eval_y, ["p", "q", "r"])
    with pytest.raises(ValueError, match="features"):
        linear_probe(train_x, train_y, eval_x[:, :2], eval_y, ["p", "q", "r"])
    with pytest.raises(ValueError, match="unique"):
        linear_probe(train_x, train_y, eval_x, eval_y, ["p", "p", "r"])


# --------------------------------------------------------------------------- partitions


def test_images_by_partition_uses_the_plant_timezone_and_lists_every_key() -> None:
    import datetime as dt

    from apex_assets.lib.embeddings import images_by_partition

    utc = dt.UTC
    images = pl.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "capture_timestamp": [
                dt.datetime(2026, 3, 1, 23, 30, tzinfo=utc),  # 2026-03-02 in Berlin
                dt.datetime(2026, 3, 2, 10, 0, tzinfo=utc),
                dt.datetime(2026, 3, 5, 10, 0, tzinfo=utc),  # outside the keys
            ],
        }
    )
    parts = images_by_partition(images, ["2026-03-01", "2026-03-02"], "Europe/Berlin")
    assert parts["2026-03-01"].height == 0
    assert sorted(parts["2026-03-02"]["image_id"]) == ["a", "b"]
    assert parts["2026-03-02"].columns == images.columns


def test_merge_partition_replaces_drops_and_reports_unchanged() -> None:
    from apex_assets.lib.embeddings import merge_partition

    def rows(ids: list[str], tag: str) -> pl.DataFrame:
        return pl.DataFrame({"image_id": ids, "extractor": [tag] * len(ids)})

    stored = rows(["a", "b", "c"], "old")
    current = pl.Series(["a", "b", "c"])
    assert merge_partition(None, None, current) is None
    assert merge_partition(stored, None, current) is None  # nothing changed: no write
    merged = merge_partition(stored, rows(["b", "d"], "new"), pl.Series(["a", "b", "c", "d"]))
    assert sorted(merged.iter_rows()) == [("a", "old"), ("b", "new"), ("c", "old"), ("d", "new")]
    shrunk = merge_partition(stored, None, pl.Series(["a", "c"]))  # b curated out
    assert sorted(shrunk["image_id"]) == ["a", "c"]
    new_only = rows(["x"], "new")
    assert merge_partition(None, new_only, pl.Series(["x"])) is new_only


def test_split_xy_gives_one_splits_matrix_and_class_indices():
    from apex_assets.lib.embeddings import split_xy

    frame = embeddings_frame(
        ["a", "b", "c"], None, np.arange(6, dtype=np.float32).reshape(3, 2), "fp"
    ).with_columns(
        pl.Series("split", ["train", "test", "train"]),
        pl.Series("label", ["CRACK", "BURR", "NO_DEFECT"]),
    )
    x, y = split_xy(frame, "train", ["NO_DEFECT", "BURR", "CRACK"])
    np.testing.assert_array_equal(x, [[0, 1], [4, 5]])
    assert y.tolist() == [2, 0] and y.dtype == np.int64
    x, y = split_xy(frame, "val", ["NO_DEFECT", "BURR", "CRACK"])
    assert x.shape == (0, 2) and y.tolist() == []
    with pytest.raises(ValueError, match="CRACK"):
        split_xy(frame, "train", ["NO_DEFECT", "BURR"])
