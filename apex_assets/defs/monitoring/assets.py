"""The line's health and the feedback loop, as assets.

* ``monitoring_metrics`` (hourly partitions): FRR, FAR, throughput per line, latency P99,
  override rate and mean confidence of one hour of production predictions, with three alert
  checks evaluated in the same step (critical FAR, high latency, warning confidence). Their
  numbers are numeric metadata, so the asset's Plots tab in the Dagster UI charts them hour by
  hour; a fired alert is a red (or yellow) check.
* ``override_report``: the weekly override-pattern table and chart.
* ``active_learning_queue``: the recent images most worth labelling, within a budget.
* ``active_learning_experiment``: random vs uncertainty vs diversity + uncertainty sampling at
  several label budgets, on the curated training set's embeddings.
* ``impact_summary``: manual inspection before vs the model after, from the data.

All logic is in ``apex_assets/lib`` (monitoring, alerts, alert_actions, override_report,
active_learning, impact); these functions read, call and store.
"""

import datetime as dt

import dagster as dg
import polars as pl

from apex_assets.config import Settings, load_settings
from apex_assets.defs.curation.assets import configured_ontology
from apex_assets.defs.features.assets import (
    configured_extractor,
    embedded_splits,
    image_embeddings,
    read_embeddings,
)
from apex_assets.defs.metadata_values import png_markdown
from apex_assets.defs.resources import LakeResource, SourceDatabaseResource
from apex_assets.lib.markdown import frame_to_markdown

MONITORING_PREFIX = "monitoring"
ALERT_CHECKS = {
    "false_accept_rate": (
        dg.AssetCheckSeverity.ERROR,
        "Critical: hourly false-accept rate above APEX_ALERT_MAX_FAR (1%); pauses auto-pass.",
    ),
    "latency_p99": (
        dg.AssetCheckSeverity.ERROR,
        "High: inference P99 above APEX_ALERT_MAX_LATENCY_P99_MS (200 ms) for "
        "APEX_ALERT_LATENCY_MINUTES (5) consecutive minutes.",
    ),
    "mean_confidence": (
        dg.AssetCheckSeverity.WARN,
        "Warning: mean confidence of the last 24 hours below APEX_ALERT_MIN_CONFIDENCE (0.85); "
        "starts the investigation job.",
    ),
}


def hourly_partitions_def(settings: Settings | None = None) -> dg.HourlyPartitionsDefinition:
    settings = settings or load_settings()
    # end_offset=1: the hour in progress is a partition too, so an operator (or the demo) can
    # look at the line so far; the schedule still materializes the hour that ended.
    return dg.HourlyPartitionsDefinition(
        start_date=settings.monitoring_start_date.strftime("%Y-%m-%d-00:00"),
        timezone=settings.partition_timezone,
        end_offset=1,
    )


hourly_partitions = hourly_partitions_def()


class ReportWindowConfig(dg.Config):
    """The end of the period a report covers; unset = now (schedules), set = reproducible."""

    end: str | None = None

    def end_time(self) -> dt.datetime:
        if self.end is None:
            return dt.datetime.now(dt.UTC)
        end = dt.datetime.fromisoformat(self.end)
        return end if end.tzinfo else end.replace(tzinfo=dt.UTC)


def _numeric(values: dict[str, object]) -> dict[str, float | int]:
    """Scalars Dagster can chart across partitions (None dropped, rounded for reading)."""
    return {
        k: (round(v, 6) if isinstance(v, float) else v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _hour_key(partition_key: str) -> str:
    return partition_key.replace(":", "-")


@dg.asset(
    group_name="monitoring",
    partitions_def=hourly_partitions,
    kinds={"postgres", "polars"},
    check_specs=[
        dg.AssetCheckSpec(name, asset="monitoring_metrics", description=doc)
        for name, (_, doc) in ALERT_CHECKS.items()
    ],
    description=(
        "One hour of the line's health from inspection.predictions and the inspectors' "
        "overrides: FRR, FAR, throughput per line, latency P50/P99, override rate, human-review "
        "rate, mean confidence; alerts as checks (FAR pauses auto-pass)."
    ),
)
def monitoring_metrics(
    context: dg.AssetExecutionContext, source_db: SourceDatabaseResource, lake: LakeResource
) -> dg.MaterializeResult:
    from apex_assets.lib import alerts, monitoring
    from apex_assets.lib.alert_actions import act_on_alerts
    from apex_assets.lib.notify import notifier_from_settings

    settings = load_settings()
    window = context.partition_time_window
    start, end = window.start.astimezone(dt.UTC), window.end.astimezone(dt.UTC)
    uri = source_db.uri()
    predictions, overrides = monitoring.read_window(uri, start, end)
    metrics = monitoring.compute_metrics(predictions, overrides, window_start=start, window_end=end)
    mean_24h, n_24h = monitoring.trailing_mean_confidence(uri, end, hours=24)
    day_start = window.start.replace(hour=0, minute=0, second=0, microsecond=0).astimezone(dt.UTC)
    fired = [
        alerts.far_alert(
            metrics.far,
            metrics.false_accepts,
            metrics.defective_parts,
            threshold=settings.alert_max_far,
            window_start=start,
            window_end=end,
        ),
        alerts.latency_alert(
            metrics.per_minute,
            limit_ms=settings.alert_max_latency_p99_ms,
            minutes=settings.alert_latency_minutes,
            window_start=start,
            window_end=end,
        ),
        # one record per plant day: the trailing-24 h mean is judged every hour, but a low day
        # is one alert (and one investigation), not 24
        alerts.confidence_alert(
            mean_24h,
            n_24h,
            threshold=settings.alert_min_confidence,
            window_start=day_start,
            window_end=end,
        ),
    ]
    outcomes = act_on_alerts(
        uri, fired, notifier_from_settings(settings), now=dt.datetime.now(dt.UTC)
    )
    for outcome in outcomes:
        if outcome.alert.fired:
            context.log.warning(
                f"ALERT [{outcome.alert.severity}] {outcome.alert.message}"
                + (" (new; sent via " + ", ".join(outcome.channels) + ")" if outcome.new else "")
                + (" -> auto-pass PAUSED" if outcome.paused else "")
            )

    key = _hour_key(context.partition_key)
    store = lake.get_lake()
    store.write(f"{MONITORING_PREFIX}/hourly/{key}.parquet", metrics.to_row())
    store.write(
        f"{MONITORING_PREFIX}/per_line/{key}.parquet",
        metrics.per_line.with_columns(pl.lit(start).alias("window_start")),
    )
    summary = metrics.to_dict()
    return dg.MaterializeResult(
        metadata={
            **_numeric(summary),
            "mean_confidence_24h": round(mean_24h, 6) if mean_24h is not None else "no data",
            "per_line": dg.MetadataValue.md(frame_to_markdown(metrics.per_line, max_rows=20)),
            "alerts": dg.MetadataValue.md(
                "\n".join(
                    f"- **{o.alert.name}** ({o.alert.severity}): "
                    f"{'FIRED' if o.alert.fired else 'ok'}, {o.alert.message}"
                    for o in outcomes
                )
            ),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=o.alert.name,
                passed=not o.alert.fired,
                severity=ALERT_CHECKS[o.alert.name][0],
                description=o.alert.message,
                metadata={
                    "value": o.alert.value if o.alert.value is not None else "no data",
                    "threshold": o.alert.threshold,
                    "notified_via": ", ".join(o.channels) or "-",
                    "paused_auto_pass": o.paused,
                },
            )
            for o in outcomes
        ],
    )


@dg.asset(
    group_name="monitoring",
    io_manager_key="lake_io",
    kinds={"postgres", "polars"},
    description=(
        "The weekly override-pattern table (counts, share, trend, action) of the last "
        "APEX_OVERRIDE_REPORT_WEEKS weeks, with a chart of overrides per week."
    ),
)
def override_report(
    context: dg.AssetExecutionContext, config: ReportWindowConfig, source_db: SourceDatabaseResource
) -> dg.Output[pl.DataFrame]:
    from apex_assets.lib import override_report as report

    settings = load_settings()
    # whole UTC days up to the last midnight (a report at 06:00 covers complete days), so the
    # 7-day bins, counted back from it, hold every override read
    end = config.end_time().replace(hour=0, minute=0, second=0, microsecond=0)
    weeks = settings.override_report_weeks
    start = end - dt.timedelta(weeks=weeks)
    overrides = report.read_overrides(source_db.uri(), start, end)
    weekly = report.drop_leading_empty_weeks(
        report.weekly_counts(overrides, start=start.date(), weeks=weeks)
    )
    if not weekly.is_empty():
        first = weekly.get_column("week_start").min()
        weeks = weekly.get_column("week_start").n_unique()
        start = dt.datetime.combine(first, dt.time(), tzinfo=dt.UTC)
    table = report.pattern_table(weekly)
    context.log.info(f"{overrides.height:,} overrides in {weeks} weeks, {table.height} patterns")
    return dg.Output(
        table,
        metadata={
            "overrides": overrides.height,
            "weeks": weeks,
            "period": f"{start.date()} .. {end.date()}",
            "report": dg.MetadataValue.md(
                report.report_markdown(table, start=start.date(), weeks=weeks)
            ),
            "chart": png_markdown(report.override_plot(weekly), "overrides per week"),
        },
    )


@dg.asset(
    group_name="monitoring",
    io_manager_key="lake_io",
    kinds={"postgres", "pytorch", "polars"},
    description=(
        "Images worth labelling: recent low-confidence production predictions chosen by "
        "uncertainty (margin) or diversity + uncertainty (k-center greedy on embeddings), "
        "APEX_ACTIVE_LEARNING_BUDGET at most."
    ),
)
def active_learning_queue(
    context: dg.AssetExecutionContext,
    config: ReportWindowConfig,
    source_db: SourceDatabaseResource,
    lake: LakeResource,
) -> dg.Output[pl.DataFrame]:
    from apex_assets.lib import active_learning
    from apex_assets.lib.labelling_candidates import labelling_pools, read_candidates

    settings = load_settings()
    end = config.end_time()
    start = end - dt.timedelta(days=settings.active_learning_window_days)
    candidates = read_candidates(
        source_db.uri(),
        start=start,
        end=end,
        max_confidence=settings.active_learning_max_confidence,
    )
    budget = settings.active_learning_budget
    strategy = settings.active_learning_strategy
    if candidates.is_empty():
        context.log.info("no low-confidence or class-less overridden prediction to choose from")
        return dg.Output(
            active_learning.empty_queue(candidates),
            metadata={"candidates": 0, "chosen": 0, "strategy": strategy},
        )
    probs, classes = active_learning.probabilities_matrix(candidates)
    needs_class, uncertain = labelling_pools(candidates)
    # critical misses whose class nobody named come first: they cannot train the model yet
    first = needs_class[:budget]
    critical = active_learning.queue_frame(
        candidates, probs, first, strategy="critical_miss", classes=classes
    ).with_columns(
        reason=pl.lit("inspector rejected a part the model passed: name the defect class")
    )
    pool, pool_probs = candidates[uncertain], probs[uncertain]
    rest = budget - len(first)
    features = None
    embedded = 0
    if strategy == "diversity" and rest > 0 and pool.height:
        shortlist = active_learning.select(
            pool_probs, None, min(pool.height, rest * 4), strategy="uncertainty"
        )
        pool, pool_probs = pool[shortlist], pool_probs[shortlist]
        features, kept = _embed_candidates(context, settings, lake, pool)
        pool, pool_probs = pool[kept], pool_probs[kept]
        embedded = len(kept)
    chosen = (
        active_learning.select(pool_probs, features, rest, strategy=strategy)
        if rest > 0 and pool.height
        else []
    )
    queue = active_learning.concat_queues(
        critical,
        active_learning.queue_frame(pool, pool_probs, chosen, strategy=strategy, classes=classes),
    )
    by_class = queue.group_by("predicted_class").len().sort("len", descending=True)
    return dg.Output(
        queue,
        metadata={
            "candidates": candidates.height,
            "critical_misses_needing_a_class": len(needs_class),
            "uncertain_candidates": len(uncertain),
            "embedded": embedded,
            "chosen": queue.height,
            "budget": budget,
            "strategy": strategy,
            "label_cost_usd": round(queue.height * settings.label_cost, 2),
            "period": f"{start.isoformat()} .. {end.isoformat()}",
            "by_predicted_class": dg.MetadataValue.md(frame_to_markdown(by_class)),
            "queue": dg.MetadataValue.md(frame_to_markdown(queue.head(20), max_rows=20)),
        },
    )


def _embed_candidates(
    context: dg.AssetExecutionContext,
    settings: Settings,
    lake: LakeResource,
    candidates: pl.DataFrame,
):
    """Embeddings of the candidate images: the lake's where the image was embedded already,
    the configured extractor for the rest. Returns (features, kept row indices)."""
    import numpy as np

    from apex_assets.lib import embeddings

    arch, preprocess, fingerprint = configured_extractor(settings)
    stored = read_embeddings(lake, fingerprint)
    known: dict[str, np.ndarray] = {}
    if stored is not None:
        hits = stored.join(candidates.select("image_id"), on="image_id", how="semi")
        known = dict(zip(hits["image_id"], embeddings.embedding_matrix(hits), strict=True))
    todo = [i for i, image_id in enumerate(candidates["image_id"]) if image_id not in known]
    if todo:
        result = embeddings.embed_image_paths(
            settings.image_root,
            candidates["image_path"].gather(todo).to_list(),
            arch=arch,
            preprocess=preprocess,
            weights=settings.embedding_weights,
            batch_size=settings.embedding_batch_size,
            workers=settings.dataloader_workers,
            threads=settings.torch_threads,
            progress=context.log.info,
        )
        for index, vector in zip(result.indices, result.vectors, strict=True):
            known[candidates["image_id"][todo[int(index)]]] = vector
        if result.failures:
            context.log.warning(f"{len(result.failures)} candidate image(s) could not be read")
    kept = [i for i, image_id in enumerate(candidates["image_id"]) if image_id in known]
    features = np.stack([known[candidates["image_id"][i]] for i in kept]) if kept else None
    return features, kept


@dg.asset(
    group_name="monitoring",
    io_manager_key="lake_io",
    deps=[image_embeddings],
    kinds={"pytorch", "polars"},
    description=(
        "Which labelling strategy buys the most accuracy per label: random, uncertainty and "
        "diversity + uncertainty sampling at several budgets on the curated set's embeddings "
        "(linear probe, test split), with the label cost and a chart."
    ),
)
def active_learning_experiment(
    context: dg.AssetExecutionContext, lake: LakeResource, balanced_splits: pl.DataFrame
) -> dg.Output[pl.DataFrame]:
    from apex_assets.lib import active_learning, embeddings

    settings = load_settings()
    joined, _ = embedded_splits(lake, settings, balanced_splits)
    classes = configured_ontology().class_ids()
    pool_x, pool_y = embeddings.split_xy(joined, "train", classes)
    test_x, test_y = embeddings.split_xy(joined, "test", classes)
    if len(pool_x) < 20 or len(test_x) == 0:
        raise dg.Failure(
            f"too few embedded images for the experiment (train {len(pool_x)}, test {len(test_x)})"
        )
    config = active_learning.ExperimentConfig(
        budgets=experiment_budgets(len(pool_x), len(classes)),
        initial=max(len(classes) * 2, len(pool_x) // 50),
        seed=settings.train_seed,
        label_cost=settings.label_cost,
    )
    context.log.info(
        f"active-learning experiment: pool {len(pool_x)}, test {len(test_x)}, "
        f"budgets {config.budgets}, {config.repeats} repeats"
    )
    table = active_learning.run_experiment(
        pool_x,
        pool_y,
        test_x,
        test_y,
        classes,
        config,
    )
    return dg.Output(
        table,
        metadata={
            "pool_images": len(pool_x),
            "test_images": len(test_x),
            "table": dg.MetadataValue.md(active_learning.experiment_markdown(table)),
            "chart": png_markdown(
                active_learning.experiment_plot(
                    table, title=f"Active learning on {settings.ontology} embeddings"
                ),
                "accuracy vs labels",
            ),
        },
    )


def experiment_budgets(pool: int, classes: int) -> tuple[int, ...]:
    """Doubling label budgets from the initial set up to half the pool (at least two)."""
    start = max(classes * 4, pool // 25)
    budgets = []
    b = start
    while b <= pool // 2:
        budgets.append(b)
        b *= 2
    return tuple(budgets) if len(budgets) >= 2 else (max(2, pool // 4), max(3, pool // 2))


@dg.asset(
    group_name="monitoring",
    io_manager_key="lake_io",
    kinds={"postgres", "polars"},
    description=(
        "Production impact from the data: manual inspection (inspection_results against the "
        "annotations) before vs the model with its overrides after: throughput, detection "
        "rate, FRR, labour, scrap and escape cost (costs from config)."
    ),
)
def impact_summary(
    context: dg.AssetExecutionContext, config: ReportWindowConfig, source_db: SourceDatabaseResource
) -> dg.Output[pl.DataFrame]:
    from apex_assets.lib import impact

    settings = load_settings()
    end = config.end_time()
    after_start = end - dt.timedelta(days=settings.impact_window_days)
    uri = source_db.uri()
    before = impact.read_before(uri, end - dt.timedelta(days=3650), after_start)
    after = impact.read_after(uri, after_start, end)
    costs = impact.ImpactCosts.from_settings(settings)
    table = impact.impact_table(before, after, costs)
    context.log.info(
        f"impact: {before.parts:,} parts inspected by hand, {after.parts:,} by the model"
    )
    return dg.Output(
        table,
        metadata={
            "parts_before": before.parts,
            "parts_after": after.parts,
            "period_after": f"{after_start.date()} .. {end.date()}",
            "summary": dg.MetadataValue.md(impact.impact_markdown(table, costs)),
        },
    )


monitoring_assets = [
    monitoring_metrics,
    override_report,
    active_learning_queue,
    active_learning_experiment,
    impact_summary,
]
