"""emlab.progress: text bars without cursor moves, redrawn at most every mininterval seconds."""

from __future__ import annotations

import io

from emlab.progress import MININTERVAL, bar


def test_nested_bars_write_no_cursor_moves_and_few_redraws():
    buf = io.StringIO()
    outer = bar(range(3), desc="domains", file=buf)
    for _ in outer:
        for _ in bar(range(500), desc="generate", leave=False, file=buf):
            pass
    text = buf.getvalue()
    assert "\x1b[" not in text and "\n\n" not in text  # tqdm's nested positions would move the cursor up
    assert "domains: 100%" in text
    # redrawn at most every MININTERVAL s: a few draws per bar, not one per item
    assert MININTERVAL >= 1 and text.count("generate:") <= 3 * 4


def test_disable_and_explicit_position_are_passed_through():
    buf = io.StringIO()
    assert list(bar([1, 2], disable=True, file=buf)) == [1, 2] and buf.getvalue() == ""
    b = bar(total=2, position=1, file=buf)
    assert b.pos in (1, -1)
    b.close()
