"""Markdown rendering of small tables for Dagster metadata (no pandas/tabulate needed)."""

from __future__ import annotations

import polars as pl


def _cell(value: object, width: int) -> str:
    text = "" if value is None else str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def frame_to_markdown(frame: pl.DataFrame, *, max_rows: int = 10, max_width: int = 40) -> str:
    """A GitHub-flavoured markdown table of the first ``max_rows`` rows."""
    if frame.width == 0:
        return "_(no columns)_"
    head = frame.head(max_rows)
    lines = [
        "| " + " | ".join(_cell(c, max_width) for c in head.columns) + " |",
        "| " + " | ".join("---" for _ in head.columns) + " |",
    ]
    lines += [
        "| " + " | ".join(_cell(v, max_width) for v in row) + " |" for row in head.iter_rows()
    ]
    if frame.height > max_rows:
        lines.append(f"\n_{frame.height - max_rows:,} more rows_")
    return "\n".join(lines)
