"""``emlab run``, ``emlab reproduce`` and ``emlab figures``: notebooks headless, and their figures.

>>> from emlab.cli import main
>>> main(["run", "notebooks/02_defences.ipynb", "-p", "n_samples", "20"])  # doctest: +SKIP
ok      notebooks/02_defences.ipynb -> runs/02_defences/20250101-120000 (41.2 s)
0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emlab import notebooks as nbs
from emlab import runs


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``run``, ``reproduce`` and ``figures`` commands to the ``emlab`` parser."""
    run = sub.add_parser(
        "run",
        help="execute one notebook headless (papermill)",
        description=(
            "Execute NOTEBOOK headless. Parameters go into the cell tagged `parameters`; the executed copy "
            "and everything the notebook writes land in runs/<notebook-stem>/<timestamp>/ (or --out-dir), "
            "which the notebook receives as its `out_dir` parameter."
        ),
    )
    run.add_argument("notebook", metavar="NOTEBOOK", help="path of the .ipynb file")
    _parameter_option(run)
    run.add_argument("--out-dir", metavar="DIR", help="run folder (default: RUNS_DIR/<stem>/<timestamp>)")
    run.add_argument("--runs-dir", default="runs", metavar="DIR", help="where run folders go (default: runs)")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the finished run in --out-dir (only the files emlab wrote are removed); without it "
        "a folder holding a finished run is refused, and a killed run with the same parameters is resumed",
    )
    _kernel_options(run)
    run.set_defaults(func=run_command)

    rep = sub.add_parser(
        "reproduce",
        help="run every notebook and summarise",
        description=(
            "Run every notebook of --notebooks-dir headless, the quickstart first, then the others by name. "
            "Each receives the -p parameters its parameters cell declares. Outputs go to runs/<stem>/<timestamp>/, "
            "figures are copied to figures/<stem>/, and runs/summary.md and figures/README.md list each notebook, "
            "its status, run folder and metrics. A failing notebook (an exception, a time limit, a dead kernel) does "
            "not stop the others; every failure is listed at the end and the exit status is 1. A -p name that no "
            "notebook declares is an error (exit 2)."
        ),
    )
    _parameter_option(rep)
    rep.add_argument("--notebooks-dir", default="notebooks", metavar="DIR", help="default: notebooks")
    rep.add_argument("--runs-dir", default="runs", metavar="DIR", help="default: runs")
    rep.add_argument("--figures-dir", default="figures", metavar="DIR", help="default: figures")
    rep.add_argument(
        "--keep-going", action="store_true", help="run the remaining notebooks after a failure (the default)"
    )
    rep.add_argument("--stop-on-failure", action="store_true", help="do not run the notebooks after a failure")
    _kernel_options(rep)
    rep.set_defaults(func=reproduce_command)

    figs = sub.add_parser(
        "figures",
        help="redraw every figure from stored runs (no training)",
        description=(
            "Redraw the figures of the newest run of each notebook from the data stored in its run folder "
            "(figure_data.json, written by emlab.plots.record), copy them to figures/<stem>/ and rewrite "
            "figures/README.md. Nothing is trained or generated."
        ),
    )
    figs.add_argument("--runs-dir", default="runs", metavar="DIR", help="default: runs")
    figs.add_argument("--figures-dir", default="figures", metavar="DIR", help="default: figures")
    figs.add_argument("--sweep", nargs="+", metavar="DIR", default=None,
                      help="instead: draw the figures of these sweep folders (every finished cell's points on one "
                           "figure per name) into DIR/figures/")
    figs.add_argument("--png", action="store_true", help="with --sweep: also write PNG (needs Chromium)")
    figs.set_defaults(func=figures_command)


def _parameter_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="set a notebook parameter; VALUE is read as YAML (numbers, true/false, lists); repeatable",
    )


def _kernel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    p.add_argument(
        "--cell-timeout",
        "--timeout",
        dest="timeout",
        type=float,
        metavar="SECONDS",
        help=f"time limit per cell; 0: none (default: ${nbs.CELL_TIMEOUT_ENV} or {nbs.DEFAULT_CELL_TIMEOUT:.0f})",
    )
    p.add_argument(
        "--notebook-timeout",
        type=float,
        metavar="SECONDS",
        help=f"time limit per notebook; 0: none (default: ${nbs.NOTEBOOK_TIMEOUT_ENV} or {nbs.DEFAULT_NOTEBOOK_TIMEOUT:.0f})",
    )


def _params(args: argparse.Namespace) -> dict:
    return {name: nbs.parse_value(value) for name, value in args.parameter}


def _warn_secrets(params: dict) -> None:
    for warning in runs.secret_parameter_warnings(params):
        print(f"warning: {warning}", file=sys.stderr)


def run_command(args: argparse.Namespace) -> int:
    """``emlab run``: 0 when the notebook ran, 1 when it failed (a cell raised, a time limit, a dead
    kernel), 2 for a bad notebook, parameter or run folder."""
    params = _params(args)
    _warn_secrets(params)
    try:
        result = nbs.run_notebook(
            args.notebook,
            params,
            out_dir=args.out_dir,
            runs_dir=args.runs_dir,
            kernel_name=args.kernel,
            timeout=args.timeout,
            notebook_timeout=args.notebook_timeout,
            progress_bar=sys.stderr.isatty(),
            overwrite=args.overwrite,
        )
    except nbs.NotebookFailed as e:
        print(e.result.describe(), file=sys.stderr)
        return 1
    except (OSError, ValueError, runs.RunLockedError) as e:  # FileNotFound, RunExists, NotADirectory, Permission
        print(f"emlab run: error: {e}", file=sys.stderr)
        return 2
    print(result.describe())
    return 0


def reproduce_command(args: argparse.Namespace) -> int:
    """``emlab reproduce``: 0 when every notebook ran, 1 when one failed, 2 for bad parameters."""
    try:
        results = nbs.reproduce(
            args.notebooks_dir,
            _params(args),
            runs_dir=args.runs_dir,
            figures_dir=args.figures_dir,
            keep_going=not args.stop_on_failure,
            kernel_name=args.kernel,
            timeout=args.timeout,
            notebook_timeout=args.notebook_timeout,
            progress_bar=sys.stderr.isatty(),
        )
    except (OSError, ValueError) as e:
        print(f"emlab reproduce: error: {e}", file=sys.stderr)
        return 2
    if not results:
        print(f"emlab reproduce: error: no notebooks in {args.notebooks_dir}", file=sys.stderr)
        return 2
    return 0 if all(r.ok for r in results) else 1


def figures_command(args: argparse.Namespace) -> int:
    """``emlab figures``: 0 when every stored figure was redrawn, 1 on an error."""
    if args.sweep:
        from emlab.plots.sweep import save_sweep_figures

        try:
            for sweep in args.sweep:
                files = save_sweep_figures(sweep, formats=("html", "png") if args.png else ("html",))
                print(f"{sweep}: {len(files)} files in {Path(sweep) / 'figures'}")
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"emlab figures: error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        nbs.rebuild_figures(args.runs_dir, args.figures_dir)
    except (FileNotFoundError, KeyError, RuntimeError) as e:
        print(f"emlab figures: error: {e}", file=sys.stderr)
        return 1
    return 0
