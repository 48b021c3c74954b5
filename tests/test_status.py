"""The README's generated status block (emlab.status) and `emlab claims --readme`."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from emlab import status as S


def card() -> pd.DataFrame:
    row = lambda claim, v, n, mean, lo, hi, paper: {  # noqa: E731
        "claim": claim, "text": f"text of {claim}", "notebook": "02_defences", "unit": "pp", "verdict": v,
        "n": n, "mean": mean, "ci_low": lo, "ci_high": hi, "paper": paper}
    return pd.DataFrame([row("a/holds", "holds", 5, -47.91, -53.6, -42.1, -17.27),
                         row("b/opposite", "opposite", 5, -50.9, -56.2, -44.6, -0.07),
                         row("c/missing", "not measured", 0, math.nan, math.nan, math.nan, None),
                         row("d/one_seed", "inconclusive", 1, 3.0, math.nan, math.nan, 2.0)])


def test_status_puts_disagreements_first_with_every_number_from_the_card():
    md = S.status_markdown(card(), "docs/claims.md", "emlab claims x --readme README.md")
    assert md.startswith("Claims of papers 001 and 002 scored on the toy organism ([docs/claims.md](docs/claims.md)")
    assert "**opposite** 1, **inconclusive** 1, **holds** 1, **not measured** 1." in md
    assert "Made by `emlab claims x --readme README.md`." in md
    assert md.index("`b/opposite`") < md.index("`d/one_seed`") < md.index("`a/holds`") < md.index("`c/missing`")
    assert "- `a/holds`: text of a/holds (paper -17.3; emlab -47.9 [-53.6, -42.1] pp, 5 seeds)" in md
    assert "(paper 2; emlab 3 pp, 1 seeds)" in md  # no interval with one seed
    assert "- `c/missing`: text of c/missing (paper –; not measured (02_defences))" in md
    with pytest.raises(ValueError, match="no claims"):
        S.status_markdown(card().iloc[0:0])


def test_replace_block_keeps_the_rest_and_names_the_file_when_markers_are_wrong():
    text = f"# t\nbefore\n{S.BEGIN}\nold 1\nold 2\n{S.END}\nafter\n"
    out = S.replace_block(text, "new\nlines", where="R.md")
    assert out == f"# t\nbefore\n{S.BEGIN}\nnew\nlines\n{S.END}\nafter\n"
    assert S.replace_block(out, "new\nlines") == out  # idempotent
    for bad in ("no markers\n", f"{S.END}\n{S.BEGIN}\n", f"{S.BEGIN}\n{S.BEGIN}\n{S.END}\n"):
        with pytest.raises(ValueError, match="R.md: needs exactly one status block"):
            S.replace_block(bad, "x", where="R.md")


def test_update_readme_rewrites_only_the_block(tmp_path: Path):
    readme = tmp_path / "README.md"
    with pytest.raises(FileNotFoundError, match="README.md does not exist"):
        S.update_readme(readme, card())
    readme.write_text(f"# x\n\n## Status\n\n{S.BEGIN}\ntyped 99%\n{S.END}\n\ntail\n")
    S.update_readme(readme, card(), page="docs/claims.md")
    text = readme.read_text()
    assert "typed 99%" not in text and text.endswith(f"{S.END}\n\ntail\n") and "`b/opposite`" in text
