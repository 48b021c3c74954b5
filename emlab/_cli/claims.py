"""``emlab claims``: score the claims of papers 001 and 002 on finished sweeps into docs/claims.md.

>>> from emlab.cli import main
>>> main(["claims", "runs/sweeps/02_defences-1a2b3c4d", "--out", "docs/claims.md"])  # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``claims`` command to the ``emlab`` parser."""
    p = sub.add_parser(
        "claims",
        help="score every testable claim of both papers on finished sweeps (docs/claims.md + a figure)",
        description=(
            "Read the ok cells of each SWEEP folder (made by `emlab sweep` from notebooks 01, 02, 03 or 05), "
            "compute each claim's effect per seed, its mean, sd and bootstrap 95%% interval over seeds, and "
            "a verdict (holds / opposite / inconclusive) by the rule stated at the top of the page. Writes "
            "OUT (Markdown, with the commands that made it at its top), OUT's .csv and a figure beside it."
        ),
        epilog="example: emlab claims runs/sweeps/02_defences-* runs/sweeps/05_narrow_vs_general-* --out docs/claims.md",
    )
    p.add_argument("sweeps", nargs="+", metavar="SWEEP", help="sweep folders (each with sweep.json)")
    p.add_argument("--out", default="docs/claims.md", help="the page to write (default: docs/claims.md)")
    p.add_argument("--paper-data", metavar="DIR", default=None,
                   help="folder with paper002_em_tables.csv and paper002_benign.csv (default: shared/data above the repository)")
    p.add_argument("--no-figure", action="store_true", help="do not draw the figure")
    p.add_argument("--png", action="store_true", help="also write the figure as PNG (needs Chromium)")
    p.add_argument("--readme", metavar="FILE", default=None,
                   help="also rewrite FILE's status block (between its status:begin / status:end marker lines) "
                        "from the scorecard")
    p.set_defaults(func=_run)


def _relative(page: str, readme: str) -> str:
    """The scorecard page as a link from the README's folder."""
    return os.path.relpath(os.path.abspath(page), os.path.dirname(os.path.abspath(readme))).replace(os.sep, "/")


def _run(args: argparse.Namespace) -> int:
    from emlab.scorecard import write_claims

    start = time.perf_counter()
    command = shlex.join(["emlab", "claims", *args.sweeps, "--out", args.out]
                         + (["--no-figure"] if args.no_figure else []) + (["--png"] if args.png else [])
                         + (["--readme", args.readme] if args.readme else []))
    try:
        card, files = write_claims(args.sweeps, args.out, command=command, figure=not args.no_figure, data_dir=args.paper_data,
                                   figure_formats=("html", "png") if args.png else ("html",))
        if args.readme:
            from emlab.status import update_readme

            files.append(update_readme(args.readme, card, page=_relative(args.out, args.readme), command=command))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"emlab claims: {e}", file=sys.stderr)
        return 2
    counts = card["verdict"].value_counts().to_dict()
    print(f"{len(card)} claims: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for f in files:
        print(f"wrote {f}")
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0
