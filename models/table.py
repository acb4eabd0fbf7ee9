"""Printing benchmark results: an aligned text table, and the same rows as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

__all__ = ["Column", "print_table", "write_json"]

Column = tuple[str, str, str]  # (row key, header, format spec such as "8.3f")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> None:
    """One line of headers, then one line per row; text columns align left, numbers right."""
    widths = [max(len(header), int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0))
              for _, header, spec in columns]
    aligns = ["<" if spec.endswith("s") else ">" for _, _, spec in columns]
    print(" ".join(f"{header:{a}{w}s}" for (_, header, _), a, w in zip(columns, aligns, widths)))
    for row in rows:
        print(" ".join(f"{format(row[key], spec):{a}{w}s}" for (key, _, spec), a, w in zip(columns, aligns, widths)))


def write_json(path: Path | None, rows: Any) -> None:
    if path is not None:
        path.write_text(json.dumps(rows, indent=2))
