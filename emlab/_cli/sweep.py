"""``emlab sweep``: one notebook over a grid of parameters, locally or on Slurm, aggregated.

>>> from emlab.cli import main
>>> main(["sweep", "notebooks/02_defences.ipynb", "-p", "seed", "0,1,2", "--workers", "2"])  # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import sys

from emlab import sweeps


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` command to the ``emlab`` parser."""
    p = sub.add_parser(
        "sweep",
        help="run a notebook over a grid of parameters (local workers or Slurm) and aggregate",
        description=(
            "Run NOTEBOOK once per cell of the cross product of the -p values (or of the cells listed in "
            "--cells, each combined with the -p values), each into its own run folder under one sweep folder "
            "(--out-dir; default runs/sweeps/<stem>-<hash of the cells>) with a manifest sweep.json. Cells that "
            "already finished with the same parameters and code are reused, so rerunning the same command "
            "continues after a kill or a failure. Failed cells are listed and do not stop the others. The "
            "metrics of the ok cells go to table.csv, summary.csv and summary.md in the sweep folder. "
            "Exit code: 0 all cells ok, 1 some failed, 2 bad input."
        ),
        epilog="example: emlab sweep notebooks/02_defences.ipynb -p seed 0,1,2 -p domains '[medical],[legal]' --workers 2",
    )
    p.add_argument("notebook", metavar="NOTEBOOK", help="path of the .ipynb file")
    p.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUES"),
        help="a swept parameter and its comma-separated values, each read as YAML as for `emlab run` "
        "(0,1,2; medical,legal; '[1, 2],[3]' for list values); repeatable: the cells are the cross product",
    )
    p.add_argument(
        "--cells", metavar="FILE", help="a listed set of cells: JSON list, JSON Lines or YAML list of parameter objects"
    )
    p.add_argument("--out-dir", metavar="DIR", help="the sweep folder (default: RUNS_DIR/sweeps/<stem>-<hash>)")
    p.add_argument("--runs-dir", default="runs", metavar="DIR", help="default: runs")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their run folders, run nothing")
    add_run_arguments(p)
    p.set_defaults(func=sweep_command)

    k = sub.add_parser(
        "sweep-pack",
        help="copy sweeps without weights and samples (the records aggregation, claims and resume read)",
        description=(
            "Copy SOURCE (a sweep folder, or a folder of them such as an `emlab claims-sweeps --out-dir`) to DEST, "
            "keeping per cell only notebook.json, sweep_cell.json, metrics.json, config.json and env.json, and "
            "per sweep its manifest and tables: a few kB a cell, to commit or share. DEST stays a sweep folder: "
            "`emlab claims DEST` scores it, and `emlab sweep`/`claims-sweeps --out-dir DEST` with the same code "
            "reuses its finished cells. Packing into an earlier pack updates it. Exit code: 0 ok, 2 bad input."
        ),
        epilog="example: emlab sweep-pack runs/claims results/claims",
    )
    k.add_argument("source", metavar="SOURCE")
    k.add_argument("dest", metavar="DEST")
    k.set_defaults(func=pack_command)


def pack_command(args: argparse.Namespace) -> int:
    """``emlab sweep-pack``: 0 when packed, 2 for bad input (nothing is written then)."""
    try:
        counts = sweeps.pack_sweeps(args.source, args.dest)
    except (FileNotFoundError, ValueError, sweeps.SweepError) as e:
        print(f"emlab sweep-pack: error: {e}", file=sys.stderr, flush=True)
        return 2
    for name, n in counts.items():
        print(f"{name or args.source}: {n} cells packed")
    print(args.dest)
    return 0


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of how a sweep runs (executor, limits, local workers, Slurm resources), shared by
    ``emlab sweep`` and ``emlab claims-sweeps``; :func:`make_executor` reads them back."""
    p.add_argument("--executor", choices=("local", "slurm"), default="local", help="default: local")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="time limit per notebook cell (default: none)")
    p.add_argument(
        "--max-time",
        type=float,
        metavar="SECONDS",
        help="time limit of the whole sweep: unfinished cells are stopped and listed as failed (default: none)",
    )
    loc = p.add_argument_group("local executor")
    loc.add_argument("--workers", type=int, metavar="N", help="worker processes (default: min(cells, cores))")
    loc.add_argument(
        "--threads", type=int, metavar="N", help="torch/OpenMP threads per worker (default: cores // workers)"
    )
    loc.add_argument(
        "--cell-time-limit",
        type=float,
        default=86400.0,
        metavar="SECONDS",
        help="kill a cell's run after this long (default: 86400)",
    )
    slurm = p.add_argument_group("slurm executor (through submitit; one array job)")
    slurm.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    slurm.add_argument("--time", type=int, default=60, metavar="MINUTES", help="time limit per cell (default: 60)")
    slurm.add_argument("--mem-gb", type=float, metavar="GB", help="memory per cell (default: the cluster's default)")
    slurm.add_argument("--gpus-per-cell", type=int, metavar="N", help="GPUs per cell (default: none)")
    slurm.add_argument(
        "--cpus-per-cell", type=int, default=1, metavar="N", help="CPUs per cell, also its torch threads (default: 1)"
    )
    slurm.add_argument(
        "--array-parallelism", type=int, default=64, metavar="N", help="cells running at once (default: 64)"
    )
    slurm.add_argument(
        "--queue-timeout",
        type=float,
        default=6 * 3600,
        metavar="SECONDS",
        help="give up on cells still pending after this long (default: 21600)",
    )


def _cells(args: argparse.Namespace) -> list[dict]:
    axes: dict[str, list] = {}
    for name, values in args.parameter:
        if not name.isidentifier():
            raise ValueError(f"-p {name}: a parameter name must be a Python identifier")
        if name in axes:
            raise ValueError(f"-p {name} is given twice; list all its values in one -p (comma-separated)")
        axes[name] = sweeps.parse_values(values)
    grid = sweeps.grid(axes) if axes else [{}]
    if not args.cells:
        if not axes:
            raise ValueError("give the swept parameters with -p NAME VALUES or list the cells with --cells FILE")
        return grid
    listed = sweeps.read_cells(args.cells)
    both = sorted({k for c in listed for k in c} & set(axes))
    if both:
        raise ValueError(f"parameter(s) {both} are both in --cells {args.cells} and given with -p")
    return [{**c, **g} for c in listed for g in grid]


def make_executor(args: argparse.Namespace) -> sweeps.LocalExecutor | sweeps.SlurmExecutor:
    """The executor the options of :func:`add_run_arguments` ask for."""
    if args.executor == "slurm":
        return sweeps.SlurmExecutor(
            partition=args.partition,
            time_min=args.time,
            mem_gb=args.mem_gb,
            gpus_per_cell=args.gpus_per_cell,
            cpus_per_cell=args.cpus_per_cell,
            array_parallelism=args.array_parallelism,
            queue_timeout=args.queue_timeout,
        )
    return sweeps.LocalExecutor(args.workers, threads=args.threads, cell_time_limit=args.cell_time_limit)


def sweep_command(args: argparse.Namespace) -> int:
    """``emlab sweep``: 0 when every cell ran ok, 1 when some failed, 2 for bad input."""

    def err(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        cells = _cells(args)
        executor = make_executor(args)
        if args.dry_run:
            root = args.out_dir or sweeps.default_sweep_dir(args.notebook, cells, args.runs_dir)
            print(f"{len(cells)} cells of {args.notebook} -> {root}")
            for c in cells:
                print(f"  cells/{sweeps.cell_name(c)}  {c}")
            return 0
        result = sweeps.run_sweep(
            args.notebook,
            cells,
            sweep_dir=args.out_dir,
            runs_dir=args.runs_dir,
            executor=executor,
            kernel_name=args.kernel,
            timeout=args.timeout,
            max_seconds=args.max_time,
            log=err,
        )
    except (FileNotFoundError, ValueError, sweeps.SweepError) as e:
        err(f"emlab sweep: error: {e}")
        return 2
    print(result.sweep_dir)
    return 0 if result.ok else 1
