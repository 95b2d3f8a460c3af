"""Markdown tables: the one helper that every report, model card and summary writes them with."""

from __future__ import annotations

from typing import Any, Callable, Sequence


def plain_cell(value: Any) -> str:
    """A value as cell text: blank for None; a `|` or a line break inside it cannot split the table."""
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]], cell: Callable[[Any], str] = plain_cell) -> list[str]:
    """The lines of a GitHub markdown table of `rows` (columns in first-seen order, a gap is a blank cell); `cell`
    renders the header names and the values."""
    if not rows:
        return []
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(cell(column) for column in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
