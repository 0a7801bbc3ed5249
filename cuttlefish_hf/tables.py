"""The one table renderer: plain-text tables for the terminal and markdown tables for model cards (stdlib only).

Example:
    >>> print(render_table(["layer", "rank"], [["fc1", 8], ["fc2", 16]]))
    layer  rank
    -----------
    fc1       8
    fc2      16
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["render_table"]

MIN_FIRST_WIDTH = 16  # max_width never cuts the first column narrower than this


def _cut_middle(text: str, width: int) -> str:
    """``text`` cut in the middle to ``width`` characters: a layer name keeps its block index and its own name."""
    if len(text) <= width:
        return text
    head = (width - 3) // 3
    return f"{text[:head]}...{text[len(text) - (width - 3 - head):]}"


def render_table(header: Sequence[str], rows: Iterable[Sequence[object]], *, align: str | None = None,
                 markdown: bool = False, max_width: int | None = None) -> str:
    """A table of ``header`` and ``rows`` (cells are ``str()``-ed), without a trailing newline.

    Args:
        align: one ``"l"`` or ``"r"`` per column; default: the first column left, the others right.
        markdown: a GitHub markdown table (``| a | b |`` and an alignment row) instead of padded plain text with
            a line of dashes under the header.
        max_width: plain text only: cut the first column's cells in the middle so that lines fit ``max_width``
            characters, down to a first column of 16.
    """
    header = [str(cell) for cell in header]
    rows = [[str(cell) for cell in row] for row in rows]
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or set(align) - {"l", "r"} or any(len(row) != len(header) for row in rows):
        raise ValueError(f"Every row and align ({align!r}) must have one entry per column of {header}.")
    if markdown:
        rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
        lines = ["| " + " | ".join(row) + " |" for row in [header, *rows]]
        return "\n".join([lines[0], rule, *lines[1:]])
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    if max_width is not None:
        room = max_width - sum(widths[1:]) - 2 * (len(header) - 1)
        widths[0] = max(min(widths[0], room), MIN_FIRST_WIDTH)
        table = [[_cut_middle(row[0], widths[0]), *row[1:]] for row in table]
    lines = ["  ".join(cell.ljust(width) if a == "l" else cell.rjust(width)
                       for cell, width, a in zip(row, widths, align)).rstrip() for row in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
