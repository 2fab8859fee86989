"""Settings come from the environment, and the README documents every one of them."""

from __future__ import annotations

import datetime as dt
from dataclasses import fields
from pathlib import Path

import pytest

from apex_assets.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_embedded(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for f in fields(Settings):
        monkeypatch.delenv(f.metadata["env"], raising=False)
    s = load_settings()
    assert s.home == tmp_path / ".apex"
    assert s.source_db_url is None and s.s3_bucket is None and not s.lake_is_s3
    assert s.embedded_pg_dir == tmp_path / ".apex" / "pg"
    assert s.lake_dir == tmp_path / ".apex" / "lake"


def test_environment_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("APEX_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("APEX_SOURCE_DB_URL", "postgresql://u@db/quality_vision")
    monkeypatch.setenv("APEX_S3_BUCKET", "lake")
    monkeypatch.setenv("APEX_PARTITION_START_DATE", "2024-03-01")
    monkeypatch.setenv("APEX_LAKE_MAX_DELTA_FILES", "4")
    s = load_settings()
    assert s.image_root == tmp_path / "h" / "nas"
    assert s.source_db_url == "postgresql://u@db/quality_vision"
    assert s.lake_is_s3
    assert s.partition_start_date == dt.date(2024, 3, 1)
    assert s.lake_max_delta_files == 4


@pytest.mark.parametrize(
    ("name", "value"),
    [("APEX_LAKE_MAX_DELTA_FILES", "many"), ("APEX_PARTITION_START_DATE", "March")],
)
def test_bad_values_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        load_settings()


def test_readme_documents_every_setting_and_starts_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    for f in fields(Settings):
        assert f"`{f.metadata['env']}`" in readme, f.metadata["env"]
    first_lines = readme.splitlines()[:5]
    commands = [line.split("#")[0].strip() for line in first_lines if line.startswith("make ")]
    assert commands == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()
