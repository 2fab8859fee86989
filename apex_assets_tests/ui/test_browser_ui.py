"""The Dagster and MLflow UIs in a real browser: the asset graph, a red alert check, the runs.

A real ``dagster-webserver`` process serves this project's Definitions on loopback, over a
SQLite instance in which one hour of the line was materialized with a false-accept rate of
4 % (see ``defs/test_monitoring_assets.py``). Headless Chromium (Debian's package, driven by
Playwright) opens the monitoring group's lineage page and the checks of
``monitoring_metrics``, and takes screenshots: with ``APEX_SAVE_SCREENSHOTS=1`` into
``docs/`` (the README shows them), else into the test's temporary folder.

Skipped, with the reason, only where Chromium or Playwright is absent; ``.ci/run`` installs
Chromium from Debian's packages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from apex_assets.config import load_settings
from apex_assets.defs.monitoring.assets import monitoring_metrics
from apex_assets.defs.resources import build_resources
from apex_assets.lib.serving_process import free_port
from apex_assets_tests import servers
from apex_assets_tests.defs.test_monitoring_assets import KEY, insert_hour
from apex_assets_tests.servers import wait_until_up

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: The flags the machine notes give: no sandbox as root, no GPU, no calls to Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCATION = "apex_assets.definitions"
DOCS = Path(__file__).resolve().parents[2] / "docs"

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"
    ),
]


@pytest.fixture(scope="module")
def webserver(tmp_path_factory: pytest.TempPathFactory, pg_server) -> Iterator[str]:
    """dagster-webserver on an instance holding one materialized, alerting hour."""
    from apex_assets.lib import source_db

    home = tmp_path_factory.mktemp("ui_home")
    dagster_home = home / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    name = f"qv_ui_{os.getpid()}"
    source_db.ensure_database(pg_server.get_uri(), name)
    uri = pg_server.get_uri(name)
    source_db.ensure_schema(uri)
    insert_hour(uri)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("APEX_", "DAGSTER_"))},
        "APEX_HOME": str(home),
        "APEX_SOURCE_DB_URL": uri,
        "DAGSTER_HOME": str(dagster_home),
    }
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    try:
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            result = dg.materialize(
                [monitoring_metrics],
                partition_key=KEY,
                resources=build_resources(load_settings()),
                instance=instance,
                raise_on_error=False,
            )
        assert result.asset_materializations_for_node("monitoring_metrics")
        port = free_port()
        log = (home / "webserver.log").open("w")
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster-webserver"),
                "-m",
                LOCATION,
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        wait_until_up(proc, f"{url}/server_info", home / "webserver.log")
        yield url
        proc.terminate()
        proc.wait(timeout=30)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open(browser, url: str, expect: str):
    """A page at ``url`` once ``expect`` is shown, with Dagster's welcome dialog dismissed."""
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(url, wait_until="networkidle")
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=5000)
        skip.click()
    except playwright.TimeoutError:
        pass  # no welcome dialog on this instance
    page.get_by_text(expect).first.wait_for(timeout=30000)
    page.wait_for_timeout(1000)  # let the graph finish its layout before the screenshot
    return page


def _shot(page, name: str, tmp_path: Path) -> Path:
    folder = DOCS if os.environ.get("APEX_SAVE_SCREENSHOTS") == "1" else tmp_path
    path = folder / name
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def test_monitoring_group_shows_every_asset(webserver: str, browser, tmp_path: Path) -> None:
    page = _open(
        browser, f"{webserver}/locations/{LOCATION}/asset-groups/monitoring", "monitoring_metrics"
    )
    text = page.inner_text("body")
    for key in (
        "monitoring_metrics",
        "override_report",
        "active_learning_queue",
        "active_learning_experiment",
        "impact_summary",
    ):
        assert key in text, f"{key} is not on the monitoring group's page"
    _shot(page, "dagster_monitoring_group.png", tmp_path)
    page.close()


def test_the_far_alert_is_a_failed_check_in_the_ui(webserver: str, browser, tmp_path: Path) -> None:
    page = _open(browser, f"{webserver}/assets/monitoring_metrics?view=checks", "false_accept_rate")
    text = page.inner_text("body")
    for check in ("false_accept_rate", "latency_p99", "mean_confidence"):
        assert check in text, f"check {check} is not listed"
    # the alerts that fired are red, the one that did not is green, and the check's page
    # carries the alert's sentence
    for check, status in (
        ("false_accept_rate", "Failed"),
        ("latency_p99", "Failed"),
        ("mean_confidence", "Succeeded"),
    ):
        assert re.search(rf"{check}\s+{check}\s+{status}", text), f"{check} is not {status}"
    assert "FAR 4.08% > 1.00% (2 of 49 defective parts passed)" in text
    _shot(page, "dagster_monitoring_checks.png", tmp_path)
    page.close()


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """An MLflow tracking server (the UI included) over a SQLite store holding one run."""
    import mlflow

    home = tmp_path_factory.mktemp("mlflow_ui")
    store = f"sqlite:///{home / 'mlflow.db'}"
    client = mlflow.MlflowClient(store)
    experiment_id = client.create_experiment(
        "visual_quality_inspection", artifact_location=str(home / "artifacts")
    )
    run = client.create_run(experiment_id, run_name="trained_model")
    for name, value in (("test_accuracy", 0.969), ("test_macro_recall", 0.968)):
        client.log_metric(run.info.run_id, name, value)
    client.log_param(run.info.run_id, "arch", "resnet18")
    client.set_terminated(run.info.run_id)
    with servers.mlflow_server(store, home / "mlflow.log") as url:
        yield url, experiment_id


def test_mlflow_ui_shows_the_experiment_and_its_run(mlflow_ui, browser, tmp_path: Path) -> None:
    url, experiment_id = mlflow_ui
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    # the experiment's runs table (the UI keeps polling: wait for the page load, not the network)
    page.goto(f"{url}/#/experiments/{experiment_id}/runs", wait_until="load")
    page.get_by_text("trained_model").first.wait_for(timeout=30000)
    page.wait_for_timeout(1000)
    text = page.inner_text("body")
    assert "visual_quality_inspection" in text and "trained_model" in text
    _shot(page, "mlflow_experiment.png", tmp_path)
    page.close()
