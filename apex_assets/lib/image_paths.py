"""Image paths from the database, confined to the image root (ARCHITECTURE section 8).

Why lexical and not ``realpath``: the image root is a NAS mount, and operators
mount further shares inside it (the VOC importer links a data set folder in the
same way). Those links are the operator's decision; what must never happen is
a *database row* reaching outside the root, which is what ``..``, absolute
paths, drive letters and NUL bytes would do. So the row's path is checked as
text, then joined under the root.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath


class UnsafeImagePathError(ValueError):
    """A path from the database would escape the image root."""


def normalize_relative_path(raw: str) -> str:
    """Return the canonical relative POSIX form of ``raw`` or raise UnsafeImagePathError."""
    if raw is None or raw.strip() == "":
        raise UnsafeImagePathError("empty image path")
    if "\x00" in raw:
        raise UnsafeImagePathError(f"NUL byte in image path {raw!r}")
    text = raw.replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise UnsafeImagePathError(f"absolute image path {raw!r} (paths are relative to the root)")
    parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeImagePathError(f"image path {raw!r} climbs out of the image root")
    if not parts:
        raise UnsafeImagePathError(f"image path {raw!r} names the root itself")
    return "/".join(parts)


def resolve_image_path(root: Path, raw: str) -> Path:
    """Absolute path of a database image path under ``root``."""
    return Path(root) / normalize_relative_path(raw)


def relative_to_root(root: Path, path: Path) -> str:
    """Inverse of :func:`resolve_image_path` for files written under the root."""
    return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
