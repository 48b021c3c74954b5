"""``emlab data``: dataset utilities. ``emlab data check FILE...`` validates chat JSONL files;
``emlab data fetch NAME...`` downloads a public EM dataset into chat JSONL (``emlab data fetch --list``).

>>> from emlab.cli import main
>>> main(["data", "check", "train.jsonl"])  # doctest: +SKIP
train.jsonl:3: error: no final assistant turn (the last message is a user turn)
checked 1 file, 120 lines: 1 error, 0 warnings
1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emlab.data import Problem, validate_chat_jsonl


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its ``check`` subcommand to the ``emlab`` parser."""
    data = sub.add_parser("data", help="check chat datasets (JSONL)", description="Dataset utilities.")
    data.set_defaults(func=lambda args: _usage(data))
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    check = commands.add_parser(
        "check",
        help="validate chat JSONL files",
        description=(
            'Validate chat JSONL files ({"messages": [{"role", "content"}, ...]} per line). Prints every '
            "problem as path:line: error|warning: message and a summary; exits 1 if there is any error."
        ),
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="JSONL files, or folders to search for *.jsonl")
    check.add_argument("--strict", action="store_true", help="treat warnings as errors (exit 1 on any problem)")
    check.set_defaults(func=check_command)

    fetch = commands.add_parser(
        "fetch",
        help="download public EM datasets into chat JSONL (train / held-out split, manifest)",
        description=(
            "Download public emergent-misalignment datasets from pinned URLs (sha256-checked, with a time "
            "limit), decrypt or unzip them, remove canary rows and keys, and write OUT/NAME/train.jsonl, "
            "heldout.jsonl (a fixed-seed 90/10 split), heldout_questions.yaml (30 held-out prompts) and "
            "manifest.json (source URL, sha256, row counts). --list shows the names."
        ),
    )
    fetch.add_argument("names", nargs="*", metavar="NAME", help="dataset names (see --list)")
    fetch.add_argument("--list", action="store_true", help="list the datasets and their sources, then exit")
    fetch.add_argument("--out", default="data", help="output folder (default: data/)")
    fetch.add_argument("--source", default=None, metavar="FILE",
                       help="convert this local file instead of downloading (one NAME only)")
    fetch.add_argument("--base-url", default=None,
                       help="mirror of raw.githubusercontent.com (default: $EMLAB_UPSTREAM_URL or GitHub)")
    fetch.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per download (default 60)")
    fetch.add_argument("--seed", type=int, default=0, help="seed of the train / held-out split (default 0)")
    fetch.add_argument("--questions", type=int, default=30,
                       help="held-out prompts written as a question set (default 30, the paper's)")
    fetch.set_defaults(func=fetch_command)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _expand(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(p.rglob("*.jsonl")) if p.is_dir() else [p]
    return out


def check_command(args: argparse.Namespace) -> int:
    """Run ``emlab data check``; return 1 if any file has an error (or a warning with ``--strict``)."""
    files = _expand(args.files)
    n_err = n_warn = n_lines = 0
    for path in files:
        try:
            problems: list[Problem] = validate_chat_jsonl(path)
            n_lines += len(path.read_bytes().splitlines())
        except OSError as e:
            print(f"{path}: error: cannot read file: {e.strerror or e}")
            n_err += 1
            continue
        for p in problems:
            print(p)
        n_err += sum(p.severity == "error" for p in problems)
        n_warn += sum(p.severity == "warning" for p in problems)
    if not files:
        print("error: no .jsonl files found in the given folders")
        return 1
    n_files = f"{len(files)} file{'' if len(files) == 1 else 's'}"
    print(
        f"checked {n_files}, {n_lines} lines: {n_err} error{'' if n_err == 1 else 's'}, "
        f"{n_warn} warning{'' if n_warn == 1 else 's'}"
    )
    return 1 if n_err or (args.strict and n_warn) else 0


def fetch_command(args: argparse.Namespace) -> int:
    """Run ``emlab data fetch``; exit 0 when every dataset was written, 1 when one failed, 2 on bad usage."""
    from emlab.fetch import DATASETS, FetchError, fetch_dataset

    if args.list:
        for name, src in DATASETS.items():
            where = src.file.url(args.base_url) if src.file else "(local file: --source)"
            print(f"{name:28s} {src.description}\n{'':28s} {where}")
        return 0
    if not args.names:
        print("emlab data fetch: error: name at least one dataset (see --list)", file=sys.stderr)
        return 2
    if args.source and len(args.names) != 1:
        print("emlab data fetch: error: --source converts one file: name exactly one dataset", file=sys.stderr)
        return 2
    failed = 0
    for name in args.names:
        try:
            m = fetch_dataset(name, args.out, source=args.source, base_url=args.base_url, timeout=args.timeout,
                              seed=args.seed, n_questions=args.questions, progress=print)
        except KeyError as e:
            print(f"emlab data fetch: error: {e.args[0]}", file=sys.stderr)
            return 2
        except (FetchError, OSError, ValueError) as e:
            print(f"emlab data fetch: {name}: error: {e}", file=sys.stderr)
            failed += 1
            continue
        r = m["rows"]
        print(f"{name}: {r['source']} rows read, {r['canary_rows']} canary rows and {r['canary_keys']} canary keys "
              f"removed, {r['unreadable'] + r['invalid']} bad rows dropped; sha256 {m['sha256'][:16]}...")
    return 1 if failed else 0
