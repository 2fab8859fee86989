"""The demo's deployment stage: the model the demo just trained goes to the line, as a plant
would take it there, over real HTTP against the bento ``deployed_bento`` built.

1. **Shadow.** The bento serves the current production model (none on a first run: every
   part goes to a person) with the new version in shadow. ``APEX_SHADOW_MIN_REQUESTS`` (500)
   validation and training images are posted as the cameras would post them.
2. **Shadow comparison.** ``shadow_comparison`` judges the shadow week in miniature: agreement
   with production (when there is one), volume, latency, and the promotion policy's verdict.
3. **Promotion.** When the policy allows it, ``production_model`` promotes the version (by
   ``apex demo``, reason recorded) and builds the production bento; otherwise the line keeps
   what it had, and the demo says why.
4. **Production.** The production bento is served and the test split is posted: answers,
   latency, the prediction log and the human-review queue, and how often the served top class
   is the part's labelled class.
5. **Inspectors.** A person checks each served part: wrong PASS / FAIL answers become
   overrides (``simulator.line.inspect_served``), as the line's inspectors would write them.
6. **Monitoring.** ``monitoring_metrics`` for the hour in progress, with its alert checks.

Why in the demo: it proves the whole path after the gate (bento -> BentoML -> ONNX Runtime ->
decision -> PostgreSQL log -> overrides -> monitoring) on the model the demo trained, not on a
fixture. Each step reuses the asset or command a plant runs; nothing here is demo-only logic.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import click
import numpy as np
import polars as pl

from apex_assets.config import Settings

ROUTE = "/api/v1/ml/predict/visual-inspection"


@dataclass
class Served:
    """What one served phase saw (client side, and the rows the service logged)."""

    bento_tag: str
    url: str
    answers: pl.DataFrame
    logged: dict[str, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return self.answers.height

    def outcomes(self) -> dict[str, int]:
        counts = self.answers.group_by("prediction").len().sort("prediction")
        return dict(zip(counts["prediction"].to_list(), counts["len"].to_list(), strict=True))

    def percentile(self, column: str, q: float) -> float:
        values = self.answers.get_column(column).drop_nulls().to_numpy()
        return float(np.percentile(values, q)) if len(values) else float("nan")

    def top_class_accuracy(self) -> float:
        ok = self.answers.filter(pl.col("status") == 200)
        return float((ok["top_class"] == ok["label"]).mean()) if ok.height else float("nan")

    def line(self) -> str:
        return (
            f"{self.requests} requests: {self.outcomes()}; client P50 "
            f"{self.percentile('client_ms', 50):.1f} ms, P99 {self.percentile('client_ms', 99):.1f}"
            f" ms; server P99 {self.percentile('server_ms', 99):.1f} ms; logged "
            f"{self.logged.get('logged', 0)} predictions (+{self.logged.get('logged_shadow', 0)}"
            f" shadow), {self.logged.get('review_queue', 0)} to the human review queue"
        )


@contextlib.contextmanager
def serving(settings: Settings, bento_tag: str, log_name: str) -> Iterator[str]:
    """``apex serve --bento TAG`` on a free loopback port for the block; yields its URL."""
    from apex_assets.cli import _serving_env
    from apex_assets.lib.serving_process import ServingProcess, ServingStartError

    log_path = settings.home / "logs" / log_name
    try:
        server = ServingProcess.start(
            ["--bento", bento_tag], env=_serving_env(settings), log=log_path
        )
    except ServingStartError as exc:
        raise click.ClickException(f"the service did not start ({log_path}): {exc}") from exc
    with server:
        yield server.url


#: Pause between two parts the demo's cameras post: about 30 parts a second, several times a
#: real line's rate (8 cameras, one part every 2.5 s each) but slow enough that the shadow model,
#: which runs after each answer and is dropped when the service is overloaded, sees every part.
CAMERA_INTERVAL_S = 0.03


def post_parts(
    settings: Settings, url: str, parts: pl.DataFrame, interval_s: float = CAMERA_INTERVAL_S
) -> pl.DataFrame:
    """Post each part's image as its camera would; one row per request with the answer."""
    import httpx

    headers = {"X-API-Key": settings.api_key} if settings.api_key else {}
    rows = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for part in parts.iter_rows(named=True):
            data = (settings.image_root / part["image_path"]).read_bytes()
            started = time.perf_counter()
            resp = client.post(
                ROUTE,
                files={"image": ("image", data)},
                data={"image_id": str(uuid.UUID(part["image_id"])), "camera_id": part["camera_id"]},
                headers=headers,
            )
            client_ms = (time.perf_counter() - started) * 1000
            is_json = resp.headers.get("content-type", "").startswith("application/json")
            body = resp.json() if is_json else {}
            ok = resp.status_code == 200
            rows.append(
                {
                    "image_id": part["image_id"],
                    "label": part["label"],
                    "status": resp.status_code,
                    "prediction": body.get("prediction") if ok else f"HTTP {resp.status_code}",
                    "top_class": body.get("top_class") if ok else None,
                    "client_ms": client_ms,
                    "server_ms": body.get("inference_time_ms") if ok else None,
                }
            )
            time.sleep(max(0.0, interval_s - (time.perf_counter() - started)))
    return pl.DataFrame(
        rows,
        schema={
            "image_id": pl.String,
            "label": pl.String,
            "status": pl.Int64,
            "prediction": pl.String,
            "top_class": pl.String,
            "client_ms": pl.Float64,
            "server_ms": pl.Float64,
        },
    )


def logged_since(uri: str, since: dt.datetime, production: int, shadow: int) -> dict[str, int]:
    """Rows the service logged since ``since``, waiting up to 10 s for its background writer
    to reach ``production`` production rows and ``shadow`` shadow rows."""
    import psycopg

    deadline = time.monotonic() + 10
    while True:
        with psycopg.connect(uri) as conn:
            logged, logged_shadow, queued = conn.execute(
                "SELECT count(*) FILTER (WHERE NOT is_shadow), count(*) FILTER (WHERE is_shadow),"
                " (SELECT count(*) FROM inspection.human_review_queue WHERE created_at >= %s)"
                " FROM inspection.predictions WHERE predicted_at >= %s",
                (since, since),
            ).fetchone()
        done = logged >= production and logged_shadow >= shadow
        if done or time.monotonic() > deadline:
            return {"logged": logged, "logged_shadow": logged_shadow, "review_queue": queued}
        time.sleep(0.5)


def serve_and_post(
    settings: Settings,
    bento_tag: str,
    parts: pl.DataFrame,
    log_name: str,
    *,
    shadow_needed: int = 0,
    spare: pl.DataFrame | None = None,
) -> Served:
    """Serve ``bento_tag``, post ``parts``, and wait for their rows in the prediction log.

    With ``shadow_needed``, parts from ``spare`` are posted in up to three more rounds while
    fewer shadow rows than that were logged (a busy machine sheds shadow evaluations).
    """
    from apex_assets.cli import source_uri

    uri = source_uri(settings)
    with serving(settings, bento_tag, log_name) as url:
        began = dt.datetime.now(dt.UTC)
        answers = post_parts(settings, url, parts)
        logged = logged_since(uri, began, answers.height, shadow_needed)
        extra = spare if spare is not None else parts
        for _ in range(3):
            missing = shadow_needed - logged["logged_shadow"]
            if missing <= 0 or extra.height == 0:
                break
            more = post_parts(settings, url, extra.head(missing))
            extra = extra.slice(missing)
            answers = pl.concat([answers, more])
            logged = logged_since(uri, began, answers.height, shadow_needed)
    return Served(bento_tag=bento_tag, url=url, answers=answers, logged=logged)


def line_parts(settings: Settings) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(shadow traffic, production traffic): validation then training images for the shadow
    phase, repeated up to twice ``APEX_SHADOW_MIN_REQUESTS`` (the first half is posted, the
    rest only when shed shadow runs must be made up); the test split for production."""
    from apex_assets.defs.resources import build_resources

    lake = build_resources(settings)["lake"].get_lake()  # type: ignore[attr-defined]
    splits = lake.read("curated/balanced_splits.parquet").select(
        "image_id", "image_path", "camera_id", "label", "split"
    )
    ordered = pl.concat(
        [splits.filter(pl.col("split") == s).sort("image_id") for s in ("val", "train")]
    )
    need = max(1, settings.shadow_min_requests)
    repeats = -(-2 * need // max(1, ordered.height))  # the rounds after the first need spares
    shadow = pl.concat([ordered] * repeats).head(2 * need)
    production = splits.filter(pl.col("split") == "test").sort("image_id")
    return shadow, production


@dataclass
class DeploymentSummary:
    """The stage's outcome, for the demo's report."""

    shadow: Served
    comparison: dict[str, object]
    promoted: str | None
    promotion_note: str
    production: Served | None = None
    overrides: dict[str, int] = field(default_factory=dict)
    monitoring: list[dict[str, object]] = field(default_factory=list)
    paused: bool = False


def run_deployment(
    settings: Settings, bento: dict[str, object], say: Callable[[str], None]
) -> DeploymentSummary:
    """Shadow -> comparison -> promotion -> production -> inspectors -> monitoring."""
    from apex_assets.cli import run_job, run_monitoring, source_uri
    from apex_assets.lib.serving_controls import auto_pass_paused
    from apex_assets.simulator.line import inspect_served

    uri = source_uri(settings)
    began = dt.datetime.now(dt.UTC)  # monitoring covers every hour this stage served in
    shadow_parts, production_parts = line_parts(settings)
    need = max(1, settings.shadow_min_requests)
    tag = str(bento["bento_tag"])
    version = str(bento["shadow_version"])
    before = str(bento.get("production_version") or "none")  # metadata says "none"
    production_before = None if before == "none" else before
    say(
        f"shadow deployment: {tag} (production "
        f"{'v' + str(production_before) if production_before else 'none: every part to a person'}"
        f", v{version} in shadow); posting {need} parts as the cameras would:"
    )
    shadow = serve_and_post(
        settings,
        tag,
        shadow_parts.head(need),
        "serve-demo-shadow.log",
        shadow_needed=need,
        spare=shadow_parts.slice(need),
    )
    say("  " + shadow.line())

    ok, rows, failures = run_job(settings, "shadow_comparison_job")
    if not ok:
        raise click.ClickException("shadow comparison failed: " + "; ".join(failures[:2]))
    comparison = rows[0] if rows else {}
    say(f"shadow comparison: {comparison.get('promotion')}")

    promoted: str | None = None
    production_tag: str | None = tag if production_before else None
    if str(comparison.get("promotion", "")).startswith("ALLOWED"):
        config = {
            "version": version,
            "approved_by": "apex demo",
            "reason": "demo: the shadow comparison passed the promotion policy",
            "force": False,
        }
        ok, rows, failures = run_job(
            settings, "promotion_job", {"ops": {"production_model": {"config": config}}}
        )
        if not ok:
            raise click.ClickException("promotion failed: " + "; ".join(failures[:2]))
        promoted = version
        production_tag = str(rows[0]["bento_tag"])
        note = f"v{version} promoted to production (was {rows[0]['previous_version']}), bento {production_tag}"
    else:
        note = f"v{version} stays in shadow: {comparison.get('promotion')}"
    say("promotion: " + note)
    summary = DeploymentSummary(
        shadow=shadow, comparison=comparison, promoted=promoted, promotion_note=note
    )
    if production_tag is None:
        say("production: no model in production yet; the line stays with its inspectors")
        return summary

    say(f"production: {production_tag}; posting the {production_parts.height} test-split parts:")
    since = dt.datetime.now(dt.UTC)
    production = serve_and_post(settings, production_tag, production_parts, "serve-demo.log")
    summary.production = production
    say("  " + production.line())
    say(f"  served top class = labelled class on {production.top_class_accuracy():.1%} of parts")

    truth = dict(
        zip(
            production_parts["image_id"].to_list(), production_parts["label"].to_list(), strict=True
        )
    )
    summary.overrides = inspect_served(uri, truth, since=since, inspector_id="INS-DEMO")
    say(
        "inspectors: "
        + (
            ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in summary.overrides.items())
            if summary.overrides
            else "no served answer overturned"
        )
        + " (overrides written)"
    )

    now = dt.datetime.now(dt.UTC)
    hours = (
        int((now - began.replace(minute=0, second=0, microsecond=0)).total_seconds() // 3600) + 1
    )
    summary.monitoring = run_monitoring(settings, now + dt.timedelta(hours=1), hours)
    for row in summary.monitoring:
        say(
            f"monitoring {row['hour']} (hour in progress): {row.get('parts', 0)} parts,"
            f" FRR {_pct(row.get('frr'))}, FAR {_pct(row.get('far'))},"
            f" P99 {_num(row.get('latency_p99_ms'))} ms, override rate "
            f"{_pct(row.get('override_rate'))}, alerts: {row['alerts'] or 'none'}"
        )
    summary.paused = auto_pass_paused(uri)
    if summary.paused:
        say(
            "  the FAR alert paused auto-pass: every PASS now goes to a person until "
            "`apex auto-pass resume --by WHO --reason WHY`"
        )
    return summary


def _pct(value: object) -> str:
    return f"{value:.2%}" if isinstance(value, int | float) else "n/a"


def _num(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "n/a"


def report_lines(summary: DeploymentSummary) -> list[str]:
    """The demo summary's lines about the line (serving, promotion, overrides, monitoring)."""
    lines = [f"shadow:      {summary.shadow.line()}", f"promotion:   {summary.promotion_note}"]
    prod = summary.production
    if prod is not None:
        lines.append(f"production:  {prod.line()}")
        lines.append(
            f"             endpoint {prod.url}{ROUTE} (stopped; `apex serve --bento "
            f"{prod.bento_tag}` starts it again); top class = label on "
            f"{prod.top_class_accuracy():.1%}"
        )
        kinds = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in summary.overrides.items())
        lines.append(f"overrides:   {kinds or 'none'} on the served parts")
        for row in summary.monitoring:
            lines.append(
                f"monitoring:  {row['hour']}: {row.get('parts', 0)} parts, FRR "
                f"{_pct(row.get('frr'))}, FAR {_pct(row.get('far'))}, alerts "
                f"{row['alerts'] or 'none'}" + ("; auto-pass paused" if summary.paused else "")
            )
    return lines


__all__ = ["DeploymentSummary", "Served", "line_parts", "report_lines", "run_deployment"]
