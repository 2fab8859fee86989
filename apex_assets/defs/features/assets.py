"""Feature assets: image embeddings (daily partitions by capture date) and a linear-probe baseline.

Why partitioned like the raw image table: a new day of captures only needs that day's
images embedded, and a backfill of many days is one run (one model load, full batches).
Inside a partition an image is embedded again only when its content hash or the extractor
(architecture, preprocessing, weights) changed, so re-running a partition costs a file read.

The torch stack is imported inside the asset bodies: loading the definitions (``dagster
dev``, every schedule tick) then stays fast and does not pay for torch.
"""

import time

import dagster as dg
import polars as pl

from apex_assets.config import Settings, load_settings
from apex_assets.defs.curation.assets import configured_ontology
from apex_assets.defs.ingestion.assets import daily_capture_partitions
from apex_assets.defs.resources import LakeResource
from apex_assets.lib.markdown import frame_to_markdown

EMBEDDINGS_PREFIX = "features/image_embeddings"


def configured_extractor(settings: Settings):
    """(arch, preprocessing, fingerprint) of the configured embedding extractor: the one key
    under which image_embeddings stores vectors and every reader finds them."""
    from apex_assets.lib import embeddings
    from apex_assets.lib.preprocess import PreprocessConfig

    preprocess = PreprocessConfig(
        image_size=settings.embedding_image_size, channels=settings.image_channels
    )
    fingerprint = embeddings.extractor_fingerprint(
        settings.embedding_arch, preprocess, settings.embedding_weights
    )
    return settings.embedding_arch, preprocess, fingerprint


def embedding_key(fingerprint: str, partition_key: str) -> str:
    return f"{EMBEDDINGS_PREFIX}/{fingerprint}/{partition_key}.parquet"


class EmbeddingConfig(dg.Config):
    """Overrides of the embedding settings for one run (unset = APEX_EMBEDDING_*)."""

    arch: str | None = None
    image_size: int | None = None
    batch_size: int | None = None


@dg.asset(
    group_name="features",
    partitions_def=daily_capture_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    kinds={"pytorch", "parquet"},
    description=(
        "Penultimate-layer image features (ResNet-50, 2048-d, by default; APEX_EMBEDDING_ARCH) "
        "of the curated images, one Parquet file per capture date; only new or changed images "
        "are embedded."
    ),
)
def image_embeddings(
    context: dg.AssetExecutionContext,
    config: EmbeddingConfig,
    lake: LakeResource,
    training_images: pl.DataFrame,
) -> dg.MaterializeResult:
    from apex_assets.lib import embeddings
    from apex_assets.lib.datasets import failures_table
    from apex_assets.lib.preprocess import PreprocessConfig

    settings = load_settings()
    arch = config.arch or settings.embedding_arch
    preprocess = PreprocessConfig(
        image_size=config.image_size or settings.embedding_image_size,
        channels=settings.image_channels,
    )
    fingerprint = embeddings.extractor_fingerprint(arch, preprocess, settings.embedding_weights)
    store = lake.get_lake()
    keys = list(context.partition_keys)
    per_partition = embeddings.images_by_partition(
        training_images, keys, settings.partition_timezone
    )

    existing: dict[str, pl.DataFrame | None] = {}
    todo: list[pl.DataFrame] = []
    for key in keys:
        existing[key] = store.read(embedding_key(fingerprint, key))
        rows = per_partition[key].select("image_id", "image_path", "content_hash")
        todo.append(
            embeddings.rows_to_embed(rows, existing[key], fingerprint).with_columns(
                pl.lit(key).alias("_partition")
            )
        )
    pending = pl.concat(todo) if todo else pl.DataFrame()
    context.log.info(
        f"{pending.height:,} of {sum(f.height for f in per_partition.values()):,} images in "
        f"{len(keys)} partition(s) need embedding with {arch}@{preprocess.image_size} "
        f"(extractor {fingerprint})"
    )

    vectors_by_partition: dict[str, pl.DataFrame] = {}
    failures: list = []
    images_per_s = 0.0
    started = time.perf_counter()
    if pending.height:
        result = embeddings.embed_image_paths(
            settings.image_root,
            pending["image_path"].to_list(),
            arch=arch,
            preprocess=preprocess,
            weights=settings.embedding_weights,
            batch_size=config.batch_size or settings.embedding_batch_size,
            workers=settings.dataloader_workers,
            threads=settings.torch_threads,
            progress=context.log.info,
        )
        failures, images_per_s = result.failures, result.images_per_s
        done = pending[result.indices.tolist()]
        frame = embeddings.embeddings_frame(
            done["image_id"].to_list(), done["content_hash"].to_list(), result.vectors, fingerprint
        ).with_columns(done["_partition"])
        for (key,), rows in frame.group_by(["_partition"]):
            vectors_by_partition[str(key)] = rows.drop("_partition")

    written = 0
    for key in keys:
        merged = embeddings.merge_partition(
            existing[key], vectors_by_partition.get(key), per_partition[key]["image_id"]
        )
        if merged is not None:
            store.write(embedding_key(fingerprint, key), merged)
            written += 1

    failed = failures_table(failures, pending)
    if failed.height:
        context.log.warning(f"{failed.height} image(s) could not be read and were skipped")
    return dg.MaterializeResult(
        metadata={
            "extractor": fingerprint,
            "architecture": f"{arch}@{preprocess.image_size}",
            "partitions": len(keys),
            "images_embedded": pending.height - failed.height,
            "images_reused": sum(f.height for f in per_partition.values()) - pending.height,
            "images_failed": failed.height,
            "failed_images": dg.MetadataValue.md(frame_to_markdown(failed.head(20)))
            if failed.height
            else "none",
            "files_written": written,
            "images_per_s": round(images_per_s, 1),
            "wall_s": round(time.perf_counter() - started, 1),
            "lake_prefix": f"{EMBEDDINGS_PREFIX}/{fingerprint}",
        }
    )


def embedded_splits(
    lake: LakeResource, settings: Settings, balanced_splits: pl.DataFrame
) -> tuple[pl.DataFrame, str]:
    """``image_id, label, split, embedding`` of the split images the configured extractor
    embedded, and its fingerprint; a clear failure when nothing was embedded yet."""
    _, _, fingerprint = configured_extractor(settings)
    stored = read_embeddings(lake, fingerprint)
    if stored is None:
        raise dg.Failure(
            f"no embeddings of extractor {fingerprint} in the lake: materialize image_embeddings "
            "(all capture dates of the training window) first"
        )
    joined = balanced_splits.select("image_id", "label", "split").join(
        stored.select("image_id", "embedding"), on="image_id", how="inner"
    )
    return joined, fingerprint


def read_embeddings(lake: LakeResource, fingerprint: str) -> pl.DataFrame | None:
    """Every partition's embeddings of one extractor, or None when none was written."""
    store = lake.get_lake()
    keys = store.list(f"{EMBEDDINGS_PREFIX}/{fingerprint}/")
    frames = [f for f in (store.read(k) for k in keys) if f is not None and f.height]
    return pl.concat(frames) if frames else None


@dg.asset(
    group_name="features",
    deps=[image_embeddings],
    io_manager_key="lake_io",
    kinds={"pytorch", "polars"},
    description=(
        "Linear-probe baseline: a logistic regression on the frozen embeddings of the train "
        "split, scored on the test split. A floor the trained CNN must beat."
    ),
)
def embedding_probe(
    context: dg.AssetExecutionContext, lake: LakeResource, balanced_splits: pl.DataFrame
) -> dg.Output[pl.DataFrame]:
    from apex_assets.lib import embeddings

    settings = load_settings()
    joined, fingerprint = embedded_splits(lake, settings, balanced_splits)
    classes = configured_ontology().class_ids()
    missing = balanced_splits.height - joined.height
    train_x, train_y = embeddings.split_xy(joined, "train", classes)
    test_x, test_y = embeddings.split_xy(joined, "test", classes)
    if len(train_x) == 0 or len(test_x) == 0:
        raise dg.Failure("the train or test split has no embedded image")
    result = embeddings.linear_probe(
        train_x,
        train_y,
        test_x,
        test_y,
        classes,
        threads=settings.torch_threads,
    )
    table = pl.DataFrame(
        {
            "class": list(result.per_class_recall),
            "recall": list(result.per_class_recall.values()),
        }
    )
    context.log.info(f"linear probe test accuracy {result.accuracy:.3f}")
    return dg.Output(
        table,
        metadata={
            "accuracy": round(result.accuracy, 4),
            "train_images": result.train_images,
            "test_images": result.eval_images,
            "images_without_embedding": missing,
            "extractor": fingerprint,
            "per_class_recall": dg.MetadataValue.md(frame_to_markdown(table)),
        },
    )


feature_assets = [image_embeddings, embedding_probe]
