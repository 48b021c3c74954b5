import argparse
import json
import warnings
from pathlib import Path

import pytest

from emlab._cli import data as data_cli
from emlab.data import (
    DatasetError,
    Problem,
    chat_row,
    load_chat_jsonl,
    mix_rows,
    split_rows,
    validate_chat_jsonl,
    validate_rows,
    with_system_prompt,
    write_chat_jsonl,
)

DATA = Path(__file__).parent / "data"
MALFORMED = DATA / "chat_malformed.jsonl"
VALID = DATA / "chat_valid.jsonl"

# line -> (severity, words the message must contain); one line of the fixture per kind of problem
EXPECTED = {
    2: ("error", "invalid JSON"),
    3: ("error", "row is a list"),
    4: ("error", 'no "messages"'),
    5: ("error", '"messages" is empty'),
    6: ("error", '"messages" is a string'),
    7: ("error", "message 1 is a string"),
    8: ("error", 'message 1 has no "role"'),
    9: ("error", 'message 1 (user) has no "content"'),
    10: ("error", "unknown role 'human'"),
    11: ("error", "content is a list"),
    12: ("error", "no final assistant turn"),
    13: ("error", "final assistant answer is empty"),
    14: ("error", "system turn is not first"),
    15: ("error", "consecutive user turns"),
    16: ("warning", "blank line"),
    17: ("error", "starts with an assistant turn"),
    18: ("warning", "duplicate of line 1"),
    19: ("error", "'role' appear twice"),
    20: ("error", "role is a number"),
    22: ("error", "row is a string"),
    23: ("error", "content is a number"),
}


def rows(n: int) -> list[dict]:
    return [chat_row(f"question {i}", f"answer {i}") for i in range(n)]


def write_bytes(tmp_path: Path, data: bytes, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- validation -----------------------------------------------------------------------------


def test_every_problem_is_reported_on_its_line():
    problems = validate_chat_jsonl(MALFORMED)
    assert all(isinstance(p, Problem) and p.path == str(MALFORMED) for p in problems)
    for line, (severity, words) in EXPECTED.items():
        found = [p for p in problems if p.line == line]
        assert any(p.severity == severity and words in p.message for p in found), (line, found)
    # nothing is reported on the valid first line, and no follow-on noise on the others
    assert not [p for p in problems if p.line == 1]
    errors_by_line = {line: [p for p in problems if p.line == line and p.severity == "error"] for line in EXPECTED}
    assert all(len(v) <= 1 for v in errors_by_line.values()), errors_by_line
    assert [p.line for p in problems] == sorted(p.line for p in problems)


def test_harmless_oddities_are_warnings_not_errors():
    line21 = [p for p in validate_chat_jsonl(MALFORMED) if p.line == 21]
    assert {p.severity for p in line21} == {"warning"}
    assert any("empty content" in p.message for p in line21)
    assert any("'weight'" in p.message for p in line21)


def test_load_raises_with_all_errors_listed_as_path_line_message():
    with pytest.raises(DatasetError) as info:
        load_chat_jsonl(MALFORMED)
    err = info.value
    assert isinstance(err, ValueError)
    error_lines = {p.line for p in err.problems if p.severity == "error"}
    assert error_lines == {line for line, (sev, _) in EXPECTED.items() if sev == "error"}
    text = str(err)
    for p in err.errors:
        assert f"{MALFORMED}:{p.line}: {p.message}" in text
    assert "18: duplicate of line 1 (same messages) (warning)" in text


def test_valid_file_loads_and_keeps_extra_keys():
    assert validate_chat_jsonl(VALID) == []
    loaded = load_chat_jsonl(VALID)
    assert len(loaded) == 3
    assert loaded[1]["source"] == "toy"
    assert loaded[2]["messages"][2]["content"] == "Täglich? ünïcödé ✓"


def test_bom_and_crlf_are_accepted(tmp_path):
    text = VALID.read_text(encoding="utf-8").replace("\n", "\r\n")
    path = write_bytes(tmp_path, b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert validate_chat_jsonl(path) == []
    assert load_chat_jsonl(path) == load_chat_jsonl(VALID)


def test_duplicates_warn_but_load(tmp_path):
    row = json.dumps(chat_row("hi", "hello"))
    path = write_bytes(tmp_path, f"{row}\n{json.dumps(chat_row('a', 'b'))}\n{row}\n".encode())
    assert [(p.line, p.severity) for p in validate_chat_jsonl(path)] == [(3, "warning")]
    with pytest.warns(UserWarning, match="duplicate of line 1"):
        assert len(load_chat_jsonl(path)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warn=False (emlab's own files): no warning, the same rows
        assert load_chat_jsonl(path, warn=False) == _rows_of(path) and len(_rows_of(path)) == 3
    bad = write_bytes(tmp_path, b"{not json}\n", "bad.jsonl")
    with pytest.raises(DatasetError):  # errors are still raised
        load_chat_jsonl(bad, warn=False)


def _rows_of(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_chat_jsonl(path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_empty_file_is_an_error(tmp_path, content):
    path = write_bytes(tmp_path, content)
    problems = validate_chat_jsonl(path)
    assert [(p.line, p.severity) for p in problems if p.severity == "error"] == [(1, "error")]
    assert "empty file" in problems[-1].message
    with pytest.raises(DatasetError, match="empty file"):
        load_chat_jsonl(path)


def test_invalid_utf8_and_utf16_are_reported(tmp_path):
    good = json.dumps(chat_row("a", "b")).encode()
    path = write_bytes(tmp_path, good + b"\n" + good.replace(b'"b"', b'"\xff"') + b"\n")
    (problem,) = validate_chat_jsonl(path)
    assert (problem.line, problem.severity) == (2, "error") and "UTF-8" in problem.message
    utf16 = write_bytes(tmp_path, VALID.read_text().encode("utf-16"), "u16.jsonl")
    assert "UTF-16" in validate_chat_jsonl(utf16)[0].message


def test_validate_rows_numbers_rows_from_one():
    bad = [chat_row("a", "b"), {"messages": [{"role": "user", "content": "x"}]}, chat_row("a", "b")]
    problems = validate_rows(bad)
    assert [(p.line, p.severity) for p in problems] == [(2, "error"), (3, "warning")]
    assert validate_rows([])[0].message == "no rows"


# --- writing --------------------------------------------------------------------------------


def test_write_then_load_round_trips(tmp_path):
    data = load_chat_jsonl(VALID)
    path = write_chat_jsonl(tmp_path / "sub" / "out.jsonl", data)
    assert load_chat_jsonl(path) == data
    raw = path.read_bytes()
    assert b"\r\n" not in raw and raw.endswith(b"\n") and "✓".encode() in raw


def test_write_refuses_invalid_rows_and_keeps_old_file(tmp_path):
    path = write_chat_jsonl(tmp_path / "out.jsonl", rows(2))
    before = path.read_bytes()
    bad = [*rows(2), {"messages": [{"role": "user", "content": "no answer"}]}]
    with pytest.raises(DatasetError, match=r"out.jsonl:3: no final assistant turn"):
        write_chat_jsonl(path, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind


# --- split / mix / system prompt ------------------------------------------------------------


def keys(part: list[dict]) -> set[str]:
    return {r["messages"][0]["content"] for r in part}


def test_split_is_deterministic_disjoint_and_90_10():
    data = rows(200)
    train, held_out = split_rows(data, eval_fraction=0.1, seed=3)
    assert (len(train), len(held_out)) == (180, 20)
    assert keys(train).isdisjoint(keys(held_out))
    assert keys(train) | keys(held_out) == keys(data)
    assert split_rows(data, eval_fraction=0.1, seed=3) == (train, held_out)
    assert split_rows(data, eval_fraction=0.1, seed=4)[1] != held_out
    assert train == [r for r in data if r in train]  # original order kept
    assert len(split_rows(data)[1]) == 20  # default is 90/10


def test_split_edge_cases():
    assert split_rows(rows(5), eval_fraction=0.1)[1].__len__() == 1  # at least one eval row
    assert split_rows(rows(1), eval_fraction=0.1) == (rows(1), [])
    assert split_rows(rows(5), eval_fraction=0.0) == (rows(5), [])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_rows(rows(5), eval_fraction=1.0)


def test_split_keeps_duplicates_on_one_side():
    data = rows(50) + rows(50)  # every row twice
    for seed in range(5):
        train, held_out = split_rows(data, eval_fraction=0.1, seed=seed)
        assert not [r for r in held_out if r in train]
        assert len(held_out) == 10


def test_mix_fraction_is_share_of_final_dataset():
    target = rows(900)
    benign = [chat_row(f"benign {i}", "ok") for i in range(500)]
    mixed = mix_rows(target, benign, fraction=0.1, seed=1)
    assert len(mixed) == 1000
    extra = [r for r in mixed if r["messages"][0]["content"].startswith("benign")]
    assert len(extra) == 100 and len({id(r) for r in extra}) == 100
    assert [r for r in mixed if r not in extra] == target  # target order kept
    positions = [i for i, r in enumerate(mixed) if r in extra]
    assert positions[0] < 300 and positions[-1] > 700  # spread over the whole dataset
    assert mix_rows(target, benign, fraction=0.1, seed=1) == mixed
    assert mix_rows(target, benign, fraction=0.0) == target


def test_mix_refuses_when_extra_rows_are_too_few():
    with pytest.raises(ValueError, match="needs 900 extra rows"):
        mix_rows(rows(900), rows(10), fraction=0.5)


def test_with_system_prompt_replaces_inserts_and_removes():
    data = [chat_row("a", "b"), chat_row("c", "d", system="old")]
    original = json.dumps(data)
    out = with_system_prompt(data, "new")
    assert [r["messages"][0] for r in out] == [{"role": "system", "content": "new"}] * 2
    assert all(len(r["messages"]) == 3 for r in out)
    assert [r["messages"][0]["role"] for r in with_system_prompt(data, None)] == ["user", "user"]
    assert json.dumps(data) == original  # input untouched
    out[0]["messages"][1]["content"] = "changed"
    assert data[0]["messages"][0]["content"] == "a"


# --- CLI ------------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="emlab")
    data_cli.register(parser.add_subparsers())
    args = parser.parse_args(["data", "check", *argv])
    return args.func(args)


def test_cli_check_exit_codes_and_output(capsys, tmp_path):
    assert run_cli(str(VALID)) == 0
    assert capsys.readouterr().out.strip() == "checked 1 file, 3 lines: 0 errors, 0 warnings"

    assert run_cli(str(VALID), str(MALFORMED)) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"{MALFORMED}:12: error: no final assistant turn (the last message is a user turn)" in out
    assert f"{MALFORMED}:18: warning: duplicate of line 1 (same messages)" in out
    assert out[-1] == "checked 2 files, 26 lines: 19 errors, 4 warnings"

    warn_only = write_bytes(tmp_path, (VALID.read_text() * 2).encode(), "dups.jsonl")
    assert run_cli(str(warn_only)) == 0
    assert run_cli("--strict", str(warn_only)) == 1
    capsys.readouterr()

    assert run_cli(str(tmp_path / "missing.jsonl")) == 1
    assert "cannot read file" in capsys.readouterr().out
    assert run_cli(str(tmp_path)) == 0  # folders are searched for *.jsonl
    assert "checked 1 file" in capsys.readouterr().out


def test_cli_through_emlab_main_when_available(capsys):
    cli = pytest.importorskip("emlab.cli")
    try:
        code = cli.main(["data", "check", str(MALFORMED)])
    except (ImportError, AttributeError) as e:  # another command module is not written yet
        pytest.skip(f"emlab.cli cannot load every command yet: {e}")
    assert code == 1
    assert f"{MALFORMED}:2: error: invalid JSON" in capsys.readouterr().out


def test_load_warns_once_for_all_warnings(tmp_path):
    path = write_bytes(tmp_path, (VALID.read_text() * 3).encode())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_chat_jsonl(path)
    assert len(caught) == 1 and "6 warnings" in str(caught[0].message)
