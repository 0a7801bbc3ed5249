"""Tests for cuttlefish_hf.tables: the one table renderer."""

from __future__ import annotations

import pytest

from cuttlefish_hf.tables import render_table


def test_plain_table_pads_aligns_and_rules_the_header():
    text = render_table(["layer", "rank", "note"], [["a.b", 8, "keep"], ["c", 16, ""]], align="lrl")
    assert text.splitlines() == ["layer  rank  note",
                                 "-----------------",
                                 "a.b       8  keep",
                                 "c        16"]


def test_markdown_table_has_an_alignment_row_and_no_padding():
    text = render_table(["layer", "shape", "rank"], [["`fc`", "8x4", 2], ["**total**", "", ""]], align="llr",
                        markdown=True)
    assert text.splitlines() == ["| layer | shape | rank |", "|---|---|---:|", "| `fc` | 8x4 | 2 |",
                                 "| **total** |  |  |"]


def test_max_width_cuts_the_first_column_in_the_middle_down_to_16():
    name = "encoder.layer.11.attention.output.dense"
    lines = render_table(["layer", "rank"], [[name, 4]], max_width=30).splitlines()
    assert max(map(len, lines)) == 30 and lines[2].startswith("encoder...") and "dense" in lines[2]
    assert len(render_table(["layer", "rank"], [[name, 4]], max_width=5).splitlines()[0]) == 16 + 2 + 4


def test_rows_must_match_the_header():
    with pytest.raises(ValueError, match="one entry per column"):
        render_table(["a", "b"], [["only one"]])
    with pytest.raises(ValueError, match="one entry per column"):
        render_table(["a", "b"], [], align="lc")
