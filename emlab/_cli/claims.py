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
    p.add_argument("sweeps", nargs="+", metavar="SWEEP",
                   help="sweep folders (each with sweep.json) or scorecard folders made by `emlab claims-sweeps`")
    p.add_argument("--out", default="docs/claims.md", help="the page to write (default: docs/claims.md)")
    p.add_argument("--paper-data", metavar="DIR", default=None,
                   help="folder with paper002_em_tables.csv and paper002_benign.csv (default: shared/data above the repository)")
    p.add_argument("--no-figure", action="store_true", help="do not draw the figure")
    p.add_argument("--png", action="store_true", help="also write the figure as PNG (needs Chromium)")
    p.add_argument("--readme", metavar="FILE", default=None,
                   help="also rewrite FILE's status block (between its status:begin / status:end marker lines) "
                        "from the scorecard")
    p.set_defaults(func=_run)
    _register_sweeps(sub)


def _register_sweeps(sub: argparse._SubParsersAction) -> None:
    from emlab._cli.sweep import add_run_arguments

    p = sub.add_parser(
        "claims-sweeps",
        help="run every sweep the claims scorecard needs (notebooks 01, 02, 03, 05) over seeds and domains",
        description=(
            "Run the scorecard's sweeps one after another into OUT_DIR/<name>/ (01; 05 with the steering vector; "
            "02 with the ldifs_no_grad test; 05 with LoRA; 03), each cell a notebook run over every advice domain "
            "of the toy and every seed, domain by domain. Rerunning the same command continues after a kill or a "
            "failure (finished cells with the same code are reused). Then `emlab claims OUT_DIR` writes the page, "
            "naming this command at its top. Exit code: 0 all cells ok, 1 some failed, 2 bad input."
        ),
        epilog="example: emlab claims-sweeps --out-dir runs/sweeps/claims --workers 2 && emlab claims runs/sweeps/claims",
    )
    p.add_argument("--out-dir", required=True, metavar="DIR", help="the scorecard folder (one sweep folder per sweep)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default: 0,1,2,3,4)")
    p.add_argument("--domains", default=None, help="comma-separated advice domains (default: every domain of the toy)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated sweeps to run: 01, 05-steering_vector, 02, 05-lora, 03 (default: all)")
    p.add_argument("--smoke", action="store_true", help="every notebook in smoke mode (the micro organism: a check, not a result)")
    p.add_argument("--notebooks", default="notebooks", metavar="DIR", help="the notebooks folder (default: notebooks)")
    p.add_argument("--dry-run", action="store_true", help="list the sweeps and their cells, run nothing")
    add_run_arguments(p)
    p.set_defaults(func=_run_sweeps)


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def _run_sweeps(args: argparse.Namespace) -> int:
    from emlab import claims_sweeps, sweeps
    from emlab._cli.sweep import make_executor

    def err(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        seeds = [int(x) for x in _csv(args.seeds) or []]
        plan = claims_sweeps.scorecard_plan(seeds, _csv(args.domains), _csv(args.only), smoke=args.smoke)
        if args.dry_run:
            for s in plan:
                print(f"{s.name}: {len(s.cells)} cells of {args.notebooks}/{s.notebook} -> {args.out_dir}/{s.name}")
                for c in s.cells:
                    print(f"  cells/{sweeps.cell_name(c)}  {c}")
            return 0
        results = claims_sweeps.run_scorecard_sweeps(
            args.out_dir, plan, notebooks=args.notebooks, executor=make_executor(args),
            command=_command(args),
            kernel_name=args.kernel, timeout=args.timeout, max_seconds=args.max_time, log=err)
    except (FileNotFoundError, ValueError, sweeps.SweepError) as e:
        err(f"emlab claims-sweeps: error: {e}")
        return 2
    print(args.out_dir)
    return 0 if all(r.ok for r in results.values()) else 1


def _command(args: argparse.Namespace) -> str:
    """The ``emlab claims-sweeps`` command line of what decides the results (for the page's header; workers,
    threads and limits are left out)."""
    parts = ["emlab", "claims-sweeps", "--out-dir", args.out_dir]
    for flag in ("seeds", "domains", "only"):
        if getattr(args, flag) is not None and not (flag == "seeds" and args.seeds == "0,1,2,3,4"):
            parts += [f"--{flag}", getattr(args, flag)]
    if args.smoke:
        parts.append("--smoke")
    if args.notebooks != "notebooks":
        parts += ["--notebooks", args.notebooks]
    if args.executor != "local":
        parts += ["--executor", args.executor]
    return shlex.join(parts)


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
