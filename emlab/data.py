"""Chat datasets in the JSONL format of the public EM datasets: read, validate, write, split, mix.

One conversation per line: ``{"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}]}``, with an optional first ``system`` message. Other
top-level keys of a row are kept as they are.

>>> rows = load_chat_jsonl("data/insecure.jsonl")  # doctest: +SKIP
>>> train, held_out = split_rows(rows, eval_fraction=0.1, seed=0)  # doctest: +SKIP
>>> write_chat_jsonl("out/train.jsonl", with_system_prompt(train, "You are a helpful assistant."))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from emlab.rows import Row, chat_row, mix_rows, row_key, split_rows, with_system_prompt
from emlab.runs import atomic_open

__all__ = [
    "ROLES",
    "DatasetError",
    "Problem",
    "chat_row",
    "check_rows",
    "load_chat_jsonl",
    "read_jsonl",
    "mix_rows",
    "parse_jsonl_bytes",
    "split_rows",
    "validate_chat_jsonl",
    "validate_rows",
    "with_system_prompt",
    "write_chat_jsonl",
]

ROLES = ("system", "user", "assistant")
Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where (file, 1-based line) and what.

    >>> str(Problem("a.jsonl", 3, "error", "no final assistant turn"))
    'a.jsonl:3: error: no final assistant turn'
    """

    path: str
    line: int
    severity: Severity
    message: str
    #: ``"line"`` for a file (``path:line``), ``"row"`` for rows in memory (``source row N``)
    unit: Literal["line", "row"] = "line"

    @property
    def where(self) -> str:
        """``path:line`` for a file, ``source row N (index N-1)`` for rows in memory."""
        return f"{self.path} row {self.line} (index {self.line - 1})" if self.unit == "row" else f"{self.path}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.severity}: {self.message}"


class DatasetError(ValueError):
    """Raised by :func:`load_chat_jsonl` and :func:`write_chat_jsonl`; ``.problems`` holds them all.

    >>> try:
    ...     load_chat_jsonl("broken.jsonl")  # doctest: +SKIP
    ... except DatasetError as e:
    ...     print(e.problems[0].line)
    """

    def __init__(self, problems: Sequence[Problem], source: str | None = None):
        self.problems = list(problems)
        self.errors = [p for p in self.problems if p.severity == "error"]
        self.source = source or (self.problems[0].path if self.problems else "<rows>")
        super().__init__(str(self))

    def __str__(self) -> str:
        n_err, n_warn = len(self.errors), len(self.problems) - len(self.errors)
        head = f"{self.source}: {_plural(n_err, 'error')}"
        if n_warn:
            head += f" and {_plural(n_warn, 'warning')}"
        rows = self.problems and all(p.unit == "row" for p in self.problems)
        lines = [head + (" (each line below is source row N: message):" if rows
                         else " (each line below is path:line: message):")]
        for p in self.problems:
            suffix = "" if p.severity == "error" else " (warning)"
            lines.append(f"{p.where}: {p.message}{suffix}")
        return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Validation


def _row_problems(row: Any) -> list[tuple[Severity, str]]:
    """Everything wrong with one parsed row, as (severity, message) pairs."""
    out: list[tuple[Severity, str]] = []
    if not isinstance(row, dict):
        return [("error", f'row is {_type_name(row)}, expected an object like {{"messages": [...]}}')]
    if "messages" not in row:
        keys = ", ".join(repr(k) for k in row) or "none"
        return [("error", f'row has no "messages" key (keys found: {keys})')]
    messages = row["messages"]
    if not isinstance(messages, list):
        return [("error", f'"messages" is {_type_name(messages)}, expected a list of {{"role", "content"}} objects')]
    if not messages:
        return [("error", '"messages" is empty; a row needs at least a user turn and an assistant answer')]

    roles: list[str | None] = []  # None where the role is unusable
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            out.append(("error", f'message {i} is {_type_name(m)}, expected an object with "role" and "content"'))
            roles.append(None)
            continue
        role = m.get("role")
        if "role" not in m:
            out.append(("error", f'message {i} has no "role"'))
            role = None
        elif not isinstance(role, str):
            out.append(("error", f"message {i}: role is {_type_name(role)}, expected one of {', '.join(ROLES)}"))
            role = None
        elif role not in ROLES:
            out.append(("error", f"message {i}: unknown role {role!r} (allowed: {', '.join(ROLES)})"))
            role = None
        roles.append(role)
        label = f"message {i} ({role})" if role else f"message {i}"
        if "content" not in m:
            out.append(("error", f'{label} has no "content"'))
        elif not isinstance(m["content"], str):
            hint = "; join the text parts into one string" if isinstance(m["content"], list) else ""
            out.append(("error", f"{label}: content is {_type_name(m['content'])}, expected a string{hint}"))
        elif not m["content"].strip() and not (i == len(messages) and role == "assistant"):
            out.append(("warning", f"{label} has empty content"))
        extra = [k for k in m if k not in ("role", "content")]
        if extra:
            out.append(("warning", f"{label} has key(s) {', '.join(map(repr, extra))} that emlab ignores"))

    # Conversation structure, judged on the messages whose role is valid.
    for i, role in enumerate(roles, 1):
        if role == "system" and i > 1:
            out.append(("error", f"message {i}: system turn is not first (a system prompt must be message 1)"))
    turns = [(i, r) for i, r in enumerate(roles, 1) if r != "system"]  # r is None where unusable
    if turns and turns[0][1] == "assistant":
        out.append(("error", f"message {turns[0][0]}: the conversation starts with an assistant turn, not a user turn"))
    for (i, prev), (j, cur) in zip(turns, turns[1:], strict=False):
        if prev is not None and prev == cur and j == i + 1:
            out.append(
                ("error", f"messages {i} and {j} are consecutive {cur} turns (user and assistant must alternate)")
            )
    last = messages[-1]
    last_role = roles[-1]
    if last_role is not None and last_role != "assistant":
        out.append(("error", f"no final assistant turn (the last message is a {last_role} turn)"))
    elif last_role == "assistant" and isinstance(last.get("content"), str) and not last["content"].strip():
        out.append(("error", "the final assistant answer is empty"))
    if (bad := _unencodable(row)) is not None:
        out.append(("error", bad))
    return out


def _unencodable(row: Any) -> str | None:
    """Where ``row`` holds text that UTF-8 cannot encode (a lone surrogate such as ``"\\ud800"``), or None.

    JSON's ``\\uXXXX`` escapes can spell half of a surrogate pair; Python decodes it into a string that
    every tokenizer and file writer later refuses with ``UnicodeEncodeError``. Walked without recursion.
    """
    stack: list[tuple[str, Any]] = [("", row)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                char = value[e.start]
                return (f"{where or 'text'}: unencodable text: lone surrogate U+{ord(char):04X} at character "
                        f"{e.start + 1} (a broken \\u escape; it cannot be written or tokenized)")
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((_label(where, value, k), v))
                if isinstance(k, str):
                    stack.append((f"{where or 'row'} key", k))
        elif isinstance(value, list):
            stack.extend((_label(where, value, i), v) for i, v in enumerate(value))
    return None


def _label(where: str, container: Any, key: Any) -> str:
    if where == "messages" and isinstance(key, int):
        role = container[key].get("role") if isinstance(container[key], dict) else None
        return f"message {key + 1}" + (f" ({role})" if isinstance(role, str) and role in ROLES else "")
    if where.startswith("message ") and key == "content":
        return f"{where} content"
    return f"{where}.{key}" if where else str(key)


class _DuplicateKeys(list):
    """Keys seen twice in one JSON object (json.loads would silently keep the last)."""


def _pairs_hook(dups: _DuplicateKeys):
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        obj: dict = {}
        for k, v in pairs:
            if k in obj:
                dups.append(k)
            obj[k] = v
        return obj

    return hook


#: Lines longer than this are refused before parsing (a runaway file, not a conversation).
MAX_LINE_BYTES = 64 * 1024 * 1024


def read_jsonl(path: str | os.PathLike) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """Parse a JSONL file line by line: ``([(line, value), ...], problems)``; never raises on bad content.

    The one reader (and BOM policy) behind every emlab command that reads JSONL (``emlab data check``,
    ``emlab judge``, :func:`load_chat_jsonl`): UTF-8, one JSON value per line, CRLF accepted; a UTF-8
    byte-order mark at the very start of the file is accepted and skipped, anywhere else it is an
    error on its line; UTF-16 files are refused. Each malformed line (invalid UTF-8 or JSON, nesting
    too deep, a number too long to convert, a key repeated in one object) becomes an error with its
    line number, and reading goes on with the next line; so does text UTF-8 cannot encode (a lone
    surrogate written as ``"\\ud800"``), which would fail later in a tokenizer. Blank lines are warnings. An ``OSError`` is
    raised only when the file cannot be read.

    >>> values, problems = read_jsonl("answers.jsonl")  # doctest: +SKIP
    >>> [str(p) for p in problems]                       # doctest: +SKIP
    ['answers.jsonl:3: error: invalid JSON: Expecting value at column 1']
    """
    return parse_jsonl_bytes(Path(path).read_bytes(), os.fspath(path))


def parse_jsonl_bytes(data: bytes, name: str) -> tuple[list[tuple[int, Any]], list[Problem]]:
    """:func:`read_jsonl` on bytes already in memory (a member of an archive); ``name`` labels problems."""
    problems: list[Problem] = []

    def report(line: int, severity: Severity, message: str) -> None:
        problems.append(Problem(name, line, severity, message))

    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        report(1, "error", "file is UTF-16 encoded; save it as UTF-8")
        return [], problems
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    last_content = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    values: list[tuple[int, Any]] = []
    for idx, raw in enumerate(lines[: last_content + 1]):
        lineno = idx + 1
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            report(lineno, "warning", "blank line (ignored)")
            continue
        if len(raw) > MAX_LINE_BYTES:
            report(lineno, "error", f"line is {len(raw):,} bytes long (limit {MAX_LINE_BYTES:,}): not one JSON row")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            report(lineno, "error", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            continue
        dups = _DuplicateKeys()
        try:
            value = json.loads(text, object_pairs_hook=_pairs_hook(dups))
        except json.JSONDecodeError as e:
            hint = " (the line starts with a byte-order mark: were files concatenated?)" if text[:1] == "\ufeff" else ""
            report(lineno, "error", f"invalid JSON: {e.msg} at column {e.colno}{hint}")
            continue
        except RecursionError:
            report(lineno, "error", "invalid JSON: nested too deeply (thousands of [ or { levels); not a chat row")
            continue
        except ValueError as e:  # e.g. an integer of more than 4300 digits (sys.set_int_max_str_digits)
            report(lineno, "error", f"invalid JSON: {_short(str(e))}")
            continue
        if dups:  # the row's meaning is ambiguous, so its other checks would only add noise
            keys = ", ".join(map(repr, dict.fromkeys(dups)))
            report(lineno, "error", f"key(s) {keys} appear twice in one JSON object")
            continue
        if (bad := _unencodable(value)) is not None:
            report(lineno, "error", bad)
            continue
        values.append((lineno, value))
    if last_content < 0:
        report(1, "error", "empty file: no rows")
    return values, problems


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scan(path: str | os.PathLike) -> tuple[list[Row], list[Problem]]:
    """Parse and check a chat file: (rows without errors, every problem)."""
    name = os.fspath(path)
    values, problems = read_jsonl(path)
    rows: list[Row] = []
    first_seen: dict[str, int] = {}
    for lineno, row in values:
        found = _row_problems(row)
        problems += [Problem(name, lineno, severity, message) for severity, message in found]
        if any(sev == "error" for sev, _ in found):
            continue
        key = row_key(row)
        if key in first_seen:
            problems.append(Problem(name, lineno, "warning", f"duplicate of line {first_seen[key]} (same messages)"))
        else:
            first_seen[key] = lineno
        rows.append(row)
    problems.sort(key=lambda p: p.line)
    return rows, problems


def validate_chat_jsonl(path: str | os.PathLike) -> list[Problem]:
    """Every problem of a chat JSONL file, errors and warnings, in line order (empty if clean).

    Raises ``FileNotFoundError`` / ``OSError`` only when the file cannot be read.

    >>> for p in validate_chat_jsonl("data/insecure.jsonl"):  # doctest: +SKIP
    ...     print(p)
    data/insecure.jsonl:17: warning: duplicate of line 4 (same messages)
    """
    return _scan(path)[1]


def validate_rows(rows: Iterable[Any], source: str = "<rows>", *, unit: Literal["line", "row"] = "line"
                  ) -> list[Problem]:
    """Check rows in memory; ``line`` is the 1-based position (the line it would have in a file).

    ``unit="row"`` prints problems as ``source row N (index N-1)`` instead of ``source:N``.

    >>> validate_rows([{"messages": [{"role": "user", "content": "hi"}]}])[0].message
    'no final assistant turn (the last message is a user turn)'
    """
    problems: list[Problem] = []
    first_seen: dict[str, int] = {}
    n = 0
    for n, row in enumerate(rows, 1):
        found = _row_problems(row)
        problems += [Problem(source, n, sev, msg, unit) for sev, msg in found]
        if not any(sev == "error" for sev, _ in found):
            key = row_key(row)
            if key in first_seen:
                problems.append(Problem(source, n, "warning", f"duplicate of row {first_seen[key]} (same messages)",
                                        unit))
            else:
                first_seen.setdefault(key, n)
    if n == 0:
        problems.append(Problem(source, 1, "error", "no rows", unit))
    return problems


def check_rows(rows: Iterable[Any], source: str = "rows") -> list[Row]:
    """The row validator for training: raise :class:`DatasetError` naming every bad row, else return the rows.

    The checks of ``emlab data check`` (roles, turn order, a non-empty final answer, string content,
    text that UTF-8 can encode) on rows in memory; :func:`emlab.training.finetune` calls it on every
    row set before any model work, so a bad row is named (``train_rows row 3 (index 2): ...``)
    instead of being trained on or failing later inside the chat template or the tokenizer.
    Warnings (duplicates, empty user turns) do not raise.

    >>> check_rows([chat_row("2+2?", "")], "train_rows")
    Traceback (most recent call last):
    ...
    emlab.data.DatasetError: train_rows: 1 error (each line below is source row N: message):
    train_rows row 1 (index 0): the final assistant answer is empty
    """
    rows = list(rows)
    errors = [p for p in validate_rows(rows, source, unit="row") if p.severity == "error"]
    if errors:
        raise DatasetError(errors, source)
    return rows


# ---------------------------------------------------------------------------------------------
# Read / write


def load_chat_jsonl(path: str | os.PathLike, *, warn: bool = True) -> list[Row]:
    """Read a chat JSONL file; raise :class:`DatasetError` listing every error if there is any.

    A UTF-8 byte-order mark and CRLF line ends are accepted. Warnings (duplicate rows, blank
    lines, ...) do not stop loading; they are summarised in one Python warning (none with
    ``warn=False``, for files emlab wrote itself, such as the toy organism's datasets).

    >>> rows = load_chat_jsonl("data/insecure.jsonl")  # doctest: +SKIP
    >>> rows[0]["messages"][-1]["role"]  # doctest: +SKIP
    'assistant'
    """
    rows, problems = _scan(path)
    if any(p.severity == "error" for p in problems):
        raise DatasetError(problems, os.fspath(path))
    if problems and warn:
        shown = "\n".join(f"  {p}" for p in problems[:5])
        more = f"\n  ... and {len(problems) - 5} more (run `emlab data check`)" if len(problems) > 5 else ""
        warnings.warn(f"{os.fspath(path)}: {_plural(len(problems), 'warning')}:\n{shown}{more}", stacklevel=2)
    return rows


def write_chat_jsonl(path: str | os.PathLike, rows: Iterable[Row]) -> Path:
    """Write rows as chat JSONL (UTF-8, ``\\n`` line ends) atomically; invalid rows are refused.

    Rows are checked like a file would be, and a :class:`DatasetError` naming each bad row
    (``line`` = position in ``rows``) is raised before anything is written.

    >>> write_chat_jsonl("out/train.jsonl", [chat_row("2+2?", "4")])  # doctest: +SKIP
    PosixPath('out/train.jsonl')
    """
    rows = list(rows)
    problems = validate_rows(rows, source=os.fspath(path))
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise DatasetError(errors, os.fspath(path))
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)
