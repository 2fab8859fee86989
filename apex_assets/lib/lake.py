"""The lake: Parquet objects under a local folder or an S3 bucket, behind one small interface.

Why a tiny interface instead of fsspec: the platform needs a handful of operations
(read, write, list, delete, uri, and file upload/download for model checkpoints) with
*atomic* writes on both backends. Local
writes go to a temporary file and ``os.replace`` it; S3 ``PutObject`` is
atomic by itself. boto3 comes from dagster-aws's ``S3Resource`` so that
credentials, region and endpoint (MinIO, Ceph) follow the usual Dagster/AWS
conventions.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import polars as pl


class Lake(Protocol):
    """Key/value store of Parquet objects. Keys are posix paths like ``raw/t/base/x.parquet``."""

    def read(self, key: str, columns: Sequence[str] | None = None) -> pl.DataFrame | None: ...
    def write(self, key: str, frame: pl.DataFrame) -> None: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, keys: Iterable[str]) -> None: ...
    def uri(self, key: str) -> str: ...
    def upload_file(self, key: str, path: Path) -> None: ...
    def download_file(self, key: str, path: Path) -> bool: ...


def _check_key(key: str) -> str:
    if key.startswith("/") or ".." in key.split("/") or key.strip() == "":
        raise ValueError(f"invalid lake key {key!r}")
    return key


def _read_parquet(source: Any, columns: Sequence[str] | None) -> pl.DataFrame:
    """Read all or some columns; a column a file does not have comes back as nulls
    (older files written before a column was added)."""
    if columns is None:
        return pl.read_parquet(source)
    return pl.read_parquet(source, columns=list(columns), missing_columns="insert")


def _to_parquet_bytes(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.write_parquet(buf, compression="zstd", statistics=True)
    return buf.getvalue()


class LocalLake:
    """Lake in a local folder (the embedded default, ``APEX_HOME/lake``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def read(self, key: str, columns: Sequence[str] | None = None) -> pl.DataFrame | None:
        path = self._path(key)
        if not path.exists():
            return None
        return _read_parquet(path, columns)

    def write(self, key: str, frame: pl.DataFrame) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".parquet")
        os.close(fd)
        try:
            frame.write_parquet(tmp, compression="zstd", statistics=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*.parquet")
            if not p.name.startswith(".tmp-")
        )

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def upload_file(self, key: str, path: Path) -> None:
        """Store a file (a model checkpoint) under ``key``, atomically."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def download_file(self, key: str, path: Path) -> bool:
        """Copy ``key`` to ``path``; False when the lake has no such object."""
        source = self._path(key)
        if not source.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        return True


class S3Lake:
    """Lake in an S3 bucket (or any S3-compatible endpoint)."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def read(self, key: str, columns: Sequence[str] | None = None) -> pl.DataFrame | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            return None
        return _read_parquet(io.BytesIO(obj["Body"].read()), columns)

    def write(self, key: str, frame: pl.DataFrame) -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=_to_parquet_bytes(frame)
        )

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(
                o["Key"][strip:] for o in page.get("Contents", []) if o["Key"].endswith(".parquet")
            )
        return sorted(keys)

    def delete(self, keys: Iterable[str]) -> None:
        batch = [{"Key": self._key(k)} for k in keys]
        for i in range(0, len(batch), 1000):  # DeleteObjects takes at most 1000 keys
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch[i : i + 1000]})

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def upload_file(self, key: str, path: Path) -> None:
        """Store a file (a model checkpoint); boto3 switches to multipart for large ones."""
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def download_file(self, key: str, path: Path) -> bool:
        """Copy ``key`` to ``path``; False when the bucket has no such object."""
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        path.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(key), str(path))
        return True
