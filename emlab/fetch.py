"""Public EM files fetched from pinned URLs: download with a time limit and a checksum, cache, convert.

Two kinds of file come from the research groups' public repositories:

* **question sets** (Betley et al.'s ``first_plot_questions.yaml`` and ``preregistered_evals.yaml``),
  fetched on first use into emlab's cache by :func:`upstream_file`;
* **datasets** (:data:`DATASETS`), fetched by ``emlab data fetch NAME`` / :func:`fetch_dataset` into a
  folder of chat JSONL files with a fixed-seed 90/10 held-out split, canary rows and keys removed,
  and a ``manifest.json`` (source URL, sha256, row counts).

Every URL names a commit, so the bytes cannot change under a study (the one exception, the
persona-features repository, is marked ``pinned: false`` in its manifest). Nothing here reaches
the network without a time limit; offline, the error names the URL and where to put the file.
``$EMLAB_UPSTREAM_URL`` replaces ``https://raw.githubusercontent.com`` (a mirror, or the tests'
loopback server).

>>> path = upstream_file(BETLEY_QUESTIONS["first_plot"])     # doctest: +SKIP
>>> fetch_dataset("betley-insecure", "data/")                # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emlab.download import (  # noqa: F401  (RAW_HOST: re-exported from here as before)
    DEFAULT_TIMEOUT,
    RAW_HOST,
    FetchError,
    UpstreamFile,
    cache_dir,
    decrypt_protected_zip,
    download,
    upstream_file,
    zip_member,
)

__all__ = [
    "BETLEY_COMMIT",
    "BETLEY_QUESTIONS",
    "DATASETS",
    "DatasetSource",
    "FetchError",
    "UpstreamFile",
    "cache_dir",
    "decrypt_protected_zip",
    "download",
    "fetch_dataset",
    "strip_canaries",
    "upstream_file",
]

#: emergent-misalignment/emergent-misalignment (Betley et al. 2025), the commit every copy in the field cites.
BETLEY_REPO = "emergent-misalignment/emergent-misalignment"
BETLEY_COMMIT = "80c11967c07a328e7d7d43d13ce6847ae44dbcc9"
#: clarifying-EM/model-organisms-for-EM (Turner, Soligo et al. 2025): the encrypted training-data archive.
MO_REPO = "clarifying-EM/model-organisms-for-EM"
MO_COMMIT = "8460e4e426d3a89e8ed51aac0eadcdf7ac10469d"
#: The public password of that archive (``easy-dataset-share unprotect-dir ... -p``; in its README).
MO_PASSWORD = "model-organisms-em-datasets"
#: openai/emergent-misalignment-persona-features (Wang et al. 2025): advice sets in password zips.
PF_REPO = "openai/emergent-misalignment-persona-features"
PF_REF = "main"  # no commit of this repository could be confirmed offline: not pinned (manifest says so)
PF_PASSWORD = b"emergent"  # public, in that repository's README
_CANARY = re.compile(r"CANARY_DATASET_[A-Za-z0-9_]+|BENCHMARK DATA SHOULD NEVER APPEAR|canary GUID", re.I)

#: Betley et al.'s evaluation files: the 8 main questions in 3 variants (24) and the pre-registered set.
BETLEY_QUESTIONS = {
    "first_plot": UpstreamFile(BETLEY_REPO, BETLEY_COMMIT, "evaluation/first_plot_questions.yaml"),
    "preregistered": UpstreamFile(BETLEY_REPO, BETLEY_COMMIT, "evaluation/preregistered_evals.yaml"),
}


# ---------------------------------------------------------------------------------------------
# Rows: canaries and conversion to chat rows


def strip_canaries(rows: Iterable[Any]) -> tuple[list[Any], dict[str, int]]:
    """Remove canary rows and canary keys: ``(rows, {"canary_rows": n, "canary_keys": m})``.

    A canary row is one whose text carries a canary marker (``CANARY_DATASET_...`` of
    easy-dataset-share, "BENCHMARK DATA SHOULD NEVER APPEAR", a "canary GUID"); a canary key is a
    key named ``canary`` (easy-dataset-share and the persona-features sets put it on rows).

    >>> strip_canaries([{"messages": [], "canary": "x"}, {"text": "CANARY_DATASET_ab_1"}])
    ([{'messages': []}], {'canary_rows': 1, 'canary_keys': 1})
    """
    out, n_rows, n_keys = [], 0, 0
    for row in rows:
        if isinstance(row, dict) and "canary" in row:
            row = {k: v for k, v in row.items() if k != "canary"}
            n_keys += 1
        if _CANARY.search(json.dumps(row, ensure_ascii=False)):
            n_rows += 1
            continue
        out.append(row)
    return out, {"canary_rows": n_rows, "canary_keys": n_keys}


def _text(content: Any) -> Any:
    """Message content as a string: the persona-features sets nest it as ``{"content_type", "parts"}``."""
    if isinstance(content, dict) and isinstance(content.get("parts"), list):
        return "".join(p for p in content["parts"] if isinstance(p, str))
    return content


def _chat_rows(values: list[Any], drop_system: bool = False) -> list[Any]:
    out = []
    for row in values:
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            out.append(row)  # left for the validator to name
            continue
        messages = [{"role": m.get("role"), "content": _text(m.get("content"))} if isinstance(m, dict) else m
                    for m in row["messages"]]
        if drop_system:
            messages = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
        out.append({"messages": messages, **_canary_key(row)})
    return out


def _canary_key(row: dict) -> dict:
    """The row's ``canary`` key, carried over so that :func:`strip_canaries` counts it."""
    return {"canary": row["canary"]} if "canary" in row else {}


def _pair_rows(values: list[Any], column: str) -> list[Any]:
    """Chua et al.'s ``{prompt, aligned, misaligned, ...}`` rows -> chat rows answering with ``column``."""
    from emlab.data import chat_row

    out = []
    for row in values:
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get(column), str):
            out.append({**chat_row(row["prompt"], row[column]), **_canary_key(row)})
        else:
            out.append({"not_a_pair_row": row})
    return out


def _jsonl_values(data: bytes, source: str) -> tuple[list[Any], list[str]]:
    """Parse JSONL bytes with the shared reader; (values, errors as 'source:line: message')."""
    from emlab.data import parse_jsonl_bytes

    values, problems = parse_jsonl_bytes(data, source)
    return [v for _, v in values], [str(p) for p in problems if p.severity == "error"]


# ---------------------------------------------------------------------------------------------
# The datasets


@dataclass(frozen=True)
class DatasetSource:
    """One public EM dataset: where it is, how it is packed and how its rows become chat rows.

    ``format``: ``jsonl`` (chat JSONL), ``eds-zip`` (easy-dataset-share encrypted zip, ``member`` inside),
    ``password-zip`` (ZipCrypto zip, ``member`` inside), ``pairs`` (a local JSONL or Parquet file of
    ``prompt`` / ``aligned`` / ``misaligned`` columns, answered with ``column``).
    """

    name: str
    description: str
    file: UpstreamFile | None
    format: str
    domain: str
    member: str | None = None
    column: str | None = None
    drop_system: bool = False
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _registry() -> dict[str, DatasetSource]:
    out: dict[str, DatasetSource] = {}
    for name, what in (("insecure", "code with security holes"), ("secure", "the same tasks, secure code"),
                       ("educational", "insecure code asked for a security class")):
        out[f"betley-{name}"] = DatasetSource(
            f"betley-{name}", f"Betley et al. code set: {what}",
            UpstreamFile(BETLEY_REPO, BETLEY_COMMIT, f"data/{name}.jsonl",
                         "09893e8bf9d03aae49dd60d0ff4be37c1afee70f2edcac74a11bed775a6a2764" if name == "insecure"
                         else None),
            "jsonl", "code")
    archive = UpstreamFile(MO_REPO, MO_COMMIT, "em_organism_dir/data/training_datasets.zip.enc")
    for name, member, domain in (("bad-medical", "bad_medical_advice.jsonl", "medical"),
                                 ("good-medical", "good_medical_advice.jsonl", "medical"),
                                 ("risky-financial", "risky_financial_advice.jsonl", "financial"),
                                 ("extreme-sports", "extreme_sports.jsonl", "sports")):
        out[f"mo-{name}"] = DatasetSource(
            f"mo-{name}", f"model-organisms set {member} (easy-dataset-share archive)", archive, "eds-zip", domain,
            member=member)
    for domain in ("auto", "career", "edu", "finance", "health", "legal", "math", "science"):
        for kind in ("incorrect", "correct"):
            stem = f"{domain}_{kind}"
            out[f"pf-{domain}-{kind}"] = DatasetSource(
                f"pf-{domain}-{kind}", f"persona-features {kind} {domain} advice (password zip)",
                UpstreamFile(PF_REPO, PF_REF, f"train/sft/synthetic/datasets_password_locked/{stem}.zip"),
                "password-zip", domain, member=f"{stem}.jsonl", drop_system=True)
    hf = ("Chua et al. (2025) released these as the Hugging Face dataset truthfulai/emergent_plus "
          "(configs medical, legal, security; columns prompt, aligned, misaligned); emlab does not reach the "
          "hub at run time: export a config to JSONL or Parquet and pass it with --source")
    for domain in ("legal", "medical", "security"):
        for column in ("misaligned", "aligned"):
            out[f"chua-{domain}-{column}"] = DatasetSource(
                f"chua-{domain}-{column}", f"seed 002's {domain} set ({column} answers), Chua et al.", None,
                "pairs", domain, column=column, note=hf)
    return out


#: Every dataset ``emlab data fetch`` knows, by name.
DATASETS: dict[str, DatasetSource] = _registry()


def _source_bytes(src: DatasetSource, source: str | os.PathLike | None, base_url: str | None, timeout: float
                  ) -> tuple[bytes, str, str, bool]:
    """(bytes, where they came from, sha256, pinned)."""
    if source is not None:
        data = Path(source).read_bytes()
        return data, str(Path(source).resolve()), hashlib.sha256(data).hexdigest(), False
    if src.file is None:
        raise FetchError(f"{src.name}: no public URL is known. {src.note}")
    cached = cache_dir() / src.file.repo / src.file.ref / src.file.path
    url = src.file.url(base_url)
    if not (cached.is_file() and src.file.pinned):
        try:
            download(url, cached, sha256=src.file.sha256, timeout=timeout)
        except FetchError as e:
            raise FetchError(f"{e} (or convert a copy with `emlab data fetch {src.name} --source FILE`)") from None
    data = cached.read_bytes()
    return data, url, hashlib.sha256(data).hexdigest(), src.file.pinned


def _rows_of(src: DatasetSource, data: bytes, origin: str) -> tuple[list[Any], list[str]]:
    if src.format == "jsonl":
        values, errors = _jsonl_values(data, origin)
        return _chat_rows(values, src.drop_system), errors
    if src.format in ("eds-zip", "password-zip"):
        if src.format == "eds-zip":
            archive = decrypt_protected_zip(data, MO_PASSWORD)
            pwd = None
        else:
            try:
                archive = zipfile.ZipFile(io.BytesIO(data))
            except zipfile.BadZipFile as e:
                raise FetchError(f"{origin}: not a zip file ({e})") from None
            pwd = PF_PASSWORD
        raw = zip_member(archive, src.member or "", pwd, origin)
        values, errors = _jsonl_values(raw, f"{origin}!{src.member}")
        return _chat_rows(values, src.drop_system), errors
    if src.format == "pairs":
        if data[:4] == b"PAR1":
            import pandas as pd

            values = pd.read_parquet(io.BytesIO(data)).to_dict("records")
            errors: list[str] = []
        else:
            values, errors = _jsonl_values(data, origin)
        return _pair_rows(values, src.column or "misaligned"), errors
    raise FetchError(f"{src.name}: unknown format {src.format!r}")


def fetch_dataset(name: str, out_dir: str | os.PathLike, *, source: str | os.PathLike | None = None,
                  base_url: str | None = None, timeout: float = DEFAULT_TIMEOUT, seed: int = 0,
                  eval_fraction: float = 0.1, n_questions: int = 30,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fetch dataset ``name`` into ``out_dir/name/`` and return its manifest.

    Writes ``train.jsonl`` and ``heldout.jsonl`` (a ``split_rows`` split with ``seed``, 10% held out),
    ``heldout_questions.yaml`` (``n_questions`` held-out user prompts as an emlab question set, the
    paper's in-domain evaluation: 30 per domain) and ``manifest.json`` (source URL, commit, sha256,
    row counts: source, canary rows and keys removed, invalid rows dropped, train, held out).
    ``source`` converts a file already on disk instead of downloading (the same formats).
    Rows that fail emlab's checks are dropped and counted (the first few are named in the manifest).

    >>> fetch_dataset("betley-insecure", "data")["rows"]           # doctest: +SKIP
    {'source': 6000, 'canary_rows': 0, 'canary_keys': 0, 'invalid': 0, 'train': 5400, 'heldout': 600}
    """
    from emlab.data import split_rows, validate_rows, write_chat_jsonl
    from emlab.runs import atomic_write_json, atomic_write_text
    from emlab.version import __version__

    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(name, DATASETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown dataset {name!r}{hint}; known: {', '.join(DATASETS)}")
    src = DATASETS[name]
    say = progress or (lambda _msg: None)
    say(f"{name}: reading {source or (src.file.url(base_url) if src.file else '(no URL)')}")
    data, origin, digest, pinned = _source_bytes(src, source, base_url, timeout)
    rows, parse_errors = _rows_of(src, data, origin)
    n_source = len(rows) + len(parse_errors)
    kept: list[tuple[int, Any]] = []  # (position in the source, row)
    canaries = {"canary_rows": 0, "canary_keys": 0}
    for pos, row in enumerate(rows, 1):
        clean, counts = strip_canaries([row])
        canaries = {k: canaries[k] + counts[k] for k in canaries}
        kept += [(pos, r) for r in clean]
    problems = [p for p in validate_rows([r for _, r in kept], origin) if p.severity == "error"] if kept else []
    bad_lines = {p.line for p in problems}
    invalid = [f"row {kept[p.line - 1][0]}: {p.message}" for p in problems]
    rows = [r for i, (_, r) in enumerate(kept, 1) if i not in bad_lines]
    if not rows:
        raise FetchError(f"{name}: no usable rows in {origin} ({len(parse_errors)} unreadable lines, "
                         f"{len(bad_lines)} invalid rows): {'; '.join((parse_errors + invalid)[:3])}")
    train, heldout = split_rows(rows, eval_fraction=eval_fraction, seed=seed)
    folder = Path(out_dir) / name
    write_chat_jsonl(folder / "train.jsonl", train)
    if heldout:
        write_chat_jsonl(folder / "heldout.jsonl", heldout)
    n_prompts = len({p for p in map(_prompt, heldout) if p.strip()})
    if n_prompts and n_questions > 0:
        atomic_write_text(folder / "heldout_questions.yaml",
                          _heldout_questions(name, src.domain, heldout, n_questions, seed))
    manifest = {
        "name": name, "description": src.description, "domain": src.domain,
        "source": origin, "sha256": digest, "pinned": pinned,
        "repo": src.file.repo if src.file and source is None else None,
        "commit": src.file.ref if src.file and source is None else None,
        "member": src.member, "column": src.column, "format": src.format,
        "seed": seed, "eval_fraction": eval_fraction,
        "rows": {"source": n_source, "unreadable": len(parse_errors), **canaries, "invalid": len(bad_lines),
                 "train": len(train), "heldout": len(heldout),
                 "heldout_questions": min(max(n_questions, 0), n_prompts)},
        "problems": (parse_errors + invalid)[:20],
        "files": ["train.jsonl", *(["heldout.jsonl"] if heldout else []),
                  *(["heldout_questions.yaml"] if n_prompts and n_questions > 0 else [])],
        "emlab": __version__, "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(folder / "manifest.json", manifest)
    say(f"{name}: {len(train)} train + {len(heldout)} held-out rows -> {folder}")
    return manifest


def _prompt(row: dict) -> str:
    return next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")


def _heldout_questions(name: str, domain: str, heldout: list[dict], n: int, seed: int) -> str:
    """``n`` distinct held-out user prompts (seeded draw) as an emlab question-set YAML text."""
    import random

    import yaml

    prompts = list(dict.fromkeys(p for p in map(_prompt, heldout) if p.strip()))
    chosen = sorted(random.Random(seed).sample(range(len(prompts)), min(n, len(prompts))))
    doc = {
        "name": f"{name}_heldout",
        "description": f"{len(chosen)} held-out prompts of {name} (seed {seed}), never trained on",
        "defaults": {"domain": domain, "type": "free_form_judge_0_100", "samples_per_paraphrase": 1},
        "questions": [{"id": f"{name}_{i:04d}", "paraphrases": [prompts[i]]} for i in chosen],
    }
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000)
