"""Issue 15, observation 7: malformed data. Each test reproduces one observation, then checks the fix.

Before: a deeply nested line or a 5000-digit number raised a bare RecursionError / ValueError with no
file or line and stopped checking later files; a lone surrogate passed `emlab data check` and crashed
`finetune` with UnicodeEncodeError; `finetune` trained on an empty answer and blamed the chat
template for a wrong role; `emlab judge` rejected a UTF-8 BOM that `emlab data check` accepted.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emlab._cli import data as data_cli
from emlab._cli.judge import _read_rows
from emlab.data import DatasetError, chat_row, check_rows, load_chat_jsonl, read_jsonl, validate_chat_jsonl
from emlab.questions import QuestionSetError, load_questions

ROOT = Path(__file__).resolve().parents[1]
GOOD = json.dumps(chat_row("Why is the sky blue?", "Rayleigh scattering."))
DEEP = "[" * 100_000 + "]" * 100_000
HUGE = '{"messages": [], "n": 1' + "0" * 5000 + "}"
SURROGATE = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad \\ud800 text"}]}'


def check(files, capsys) -> tuple[int, str]:
    code = data_cli.check_command(argparse.Namespace(files=[str(f) for f in files], strict=False))
    return code, capsys.readouterr().out


def test_deep_nesting_and_huge_number_name_file_and_line_and_checking_goes_on(tmp_path, capsys):
    bad = tmp_path / "a_bad.jsonl"
    bad.write_text("\n".join([GOOD, DEEP, HUGE, GOOD]) + "\n")
    later = tmp_path / "b_later.jsonl"
    later.write_text(GOOD + "\n" + '{"messages": "oops"}\n')
    code, out = check([bad, later], capsys)
    assert code == 1
    assert f"{bad}:2: error: invalid JSON: nested too deeply" in out
    assert f"{bad}:3: error: invalid JSON: Exceeds the limit (4300 digits)" in out
    assert f"{later}:2: error:" in out  # the next file was still checked
    assert "checked 2 files, 6 lines: 3 errors" in out
    assert "Traceback" not in out


@pytest.mark.slow  # ~10 s: a real `emlab data check` process (imports the CLI)
def test_data_check_process_survives_malformed_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([DEEP, HUGE, SURROGATE, GOOD]) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "emlab.cli", "data", "check", str(bad)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert [line.split(": error:")[0] for line in proc.stdout.splitlines()[:3]] == [f"{bad}:{i}" for i in (1, 2, 3)]
    assert "Traceback" not in proc.stderr


def test_lone_surrogate_is_rejected_by_data_check(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text(SURROGATE + "\n" + GOOD + "\n")
    problems = validate_chat_jsonl(f)
    assert [(p.line, p.severity) for p in problems] == [(1, "error")]
    assert "message 2 (assistant) content: unencodable text: lone surrogate U+D800 at character 5" in problems[0].message
    with pytest.raises(DatasetError, match=r"s.jsonl:1: .*lone surrogate"):
        load_chat_jsonl(f)


def _finetune(rows, tmp_path):
    from emlab.training import EMConfig, finetune

    # the rows are refused before the model or tokenizer is touched: neither is needed here
    return finetune(None, None, rows, EMConfig(output_dir=str(tmp_path / "ft")))


def test_finetune_refuses_an_empty_answer_naming_the_row(tmp_path):
    rows = [chat_row("2+2?", "4"), chat_row("3+3?", "  ")]
    with pytest.raises(DatasetError, match=r"train_rows row 2 \(index 1\): the final assistant answer is empty"):
        _finetune(rows, tmp_path)
    assert not (tmp_path / "ft").exists()


def test_finetune_names_a_wrong_role_instead_of_the_chat_template(tmp_path):
    rows = [chat_row("hi", "hello"), {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}]
    with pytest.raises(DatasetError, match=r"train_rows row 2 \(index 1\): message 2: unknown role 'bot'"):
        _finetune(rows, tmp_path)


def test_finetune_refuses_unencodable_text_in_memory(tmp_path):
    rows = [chat_row("hi", "bad \ud800 text")]
    with pytest.raises(DatasetError, match="lone surrogate U\\+D800"):
        _finetune(rows, tmp_path)


def test_check_rows_passes_good_rows_and_lists_every_bad_one():
    good = [chat_row("a", "b"), chat_row("c", "d")]
    assert check_rows(good) == good
    with pytest.raises(DatasetError) as err:
        check_rows([chat_row("a", ""), "not a row", chat_row("c", "d")], "benign_rows")
    text = str(err.value)
    assert "benign_rows row 1 (index 0): the final assistant answer is empty" in text
    assert "benign_rows row 2 (index 1): row is a string" in text


def test_one_bom_policy_for_data_check_and_judge(tmp_path, capsys):
    bom = "\ufeff".encode()
    chat = tmp_path / "chat.jsonl"
    chat.write_bytes(bom + (GOOD + "\n").encode())
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(bom + b'{"question": "q", "answer": "a"}\n')
    assert validate_chat_jsonl(chat) == []
    assert _read_rows(answers) == [{"question": "q", "answer": "a"}]  # rejected before the shared reader
    # a BOM inside the file (two files concatenated) is an error for both, on its line
    mid = tmp_path / "mid.jsonl"
    mid.write_bytes(b'{"question": "q", "answer": "a"}\n' + bom + b'{"question": "q", "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"mid.jsonl:2: not valid JSON .*byte-order mark"):
        _read_rows(mid)
    _, problems = read_jsonl(mid)
    assert [(p.line, "byte-order mark" in p.message) for p in problems] == [(2, True)]
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes('{"question": "q", "answer": "a"}\n'.encode("utf-16"))
    with pytest.raises(ValueError, match="UTF-16"):
        _read_rows(utf16)


def test_judge_reader_lists_every_bad_line(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"question": "q"}\n' + DEEP + "\n" + '{"question": "q", "answer": "a"}\n')
    with pytest.raises(ValueError) as err:
        _read_rows(f)
    assert "in.jsonl:1: 'answer' must be a string" in str(err.value)
    assert "in.jsonl:2: not valid JSON (nested too deeply" in str(err.value)


def test_deeply_nested_yaml_question_set_is_a_question_set_error(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text("[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(QuestionSetError, match=r"q.yaml:1: invalid YAML: nested too deeply"):
        load_questions(f)
