"""File objects in the local lake (model checkpoints): atomic upload, download, absent keys."""

from __future__ import annotations

import pytest

from apex_assets.lib.lake import LocalLake


def test_upload_then_download_round_trip(tmp_path):
    lake = LocalLake(tmp_path / "lake")
    source = tmp_path / "best.ckpt"
    source.write_bytes(b"\x00weights" * 1000)
    lake.upload_file("checkpoints/run-1/best.ckpt", source)
    stored = tmp_path / "lake" / "checkpoints" / "run-1" / "best.ckpt"
    assert stored.read_bytes() == source.read_bytes()
    assert not list(stored.parent.glob(".tmp-*"))  # the temporary copy was renamed
    target = tmp_path / "restore" / "best.ckpt"
    assert lake.download_file("checkpoints/run-1/best.ckpt", target)
    assert target.read_bytes() == source.read_bytes()
    assert not lake.download_file("checkpoints/run-2/best.ckpt", tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


def test_keys_cannot_escape_the_lake(tmp_path):
    lake = LocalLake(tmp_path / "lake")
    source = tmp_path / "f"
    source.write_bytes(b"x")
    with pytest.raises(ValueError):
        lake.upload_file("../outside.ckpt", source)
