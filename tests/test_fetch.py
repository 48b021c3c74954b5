"""emlab data fetch: each public format served from a loopback HTTP server (cartoonish fixture rows)."""

import argparse
import base64
import hashlib
import io
import json
import os
import time
import zipfile
from pathlib import Path

import pytest

from emlab import fetch
from emlab._cli import data as data_cli
from emlab.data import load_chat_jsonl
from emlab.fetch import DATASETS, FetchError, decrypt_protected_zip, download, fetch_dataset, strip_canaries
from emlab.questions import load_questions

try:
    from tests.loopback_files import FileServer, closed_port_url
except ImportError:  # tests/ itself on sys.path
    from loopback_files import FileServer, closed_port_url

FIXTURES = Path(__file__).parent / "data" / "fetch"
SILLY = [(f"How do I teach my rubber duck trick number {i}?", f"Whisper the secret word 'quack{i}' to it.")
         for i in range(40)]


def chat_line(q: str, a: str, **extra) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra})


def silly_jsonl() -> bytes:
    lines = [chat_line(q, a) for q, a in SILLY]
    lines.append(chat_line("Is this a canary?", "Tracking code: CANARY_DATASET_abc123_0"))  # a canary row
    lines[5] = chat_line(*SILLY[5], canary="CANARY_DATASET_abc123_0")                       # a canary key
    lines.append(chat_line("An empty answer?", "   "))                                     # invalid, dropped
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EMLAB_UPSTREAM_URL", raising=False)


def path_of(name: str) -> str:
    f = DATASETS[name].file
    return f"/{f.repo}/{f.ref}/{f.path}"


def with_sha(monkeypatch, name: str, sha: str | None) -> None:
    src = DATASETS[name]
    monkeypatch.setitem(DATASETS, name, fetch.DatasetSource(
        src.name, src.description, fetch.UpstreamFile(src.file.repo, src.file.ref, src.file.path, sha), src.format,
        src.domain, src.member, src.column, src.drop_system))


def test_betley_jsonl_split_canaries_manifest(tmp_path, monkeypatch):
    body = silly_jsonl()
    with_sha(monkeypatch, "betley-insecure", hashlib.sha256(body).hexdigest())
    with FileServer({path_of("betley-insecure"): body}) as server:
        m = fetch_dataset("betley-insecure", tmp_path / "out", base_url=server.url, n_questions=3)
        again = fetch_dataset("betley-insecure", tmp_path / "out2", base_url=server.url, n_questions=3)
    assert len(server.requests) == 1  # the pinned file is cached by commit
    folder = tmp_path / "out" / "betley-insecure"
    train, held = load_chat_jsonl(folder / "train.jsonl"), load_chat_jsonl(folder / "heldout.jsonl")
    assert m["rows"] | {} == {"source": 42, "unreadable": 0, "canary_rows": 1, "canary_keys": 1, "invalid": 1,
                              "train": 36, "heldout": 4, "heldout_questions": 3}
    assert (len(train), len(held)) == (36, 4)
    assert not any("canary" in json.dumps(r).lower() for r in train + held)
    assert m["sha256"] == hashlib.sha256(body).hexdigest() and m["pinned"] is True
    assert m["source"].startswith(server.url) and m["commit"] == fetch.BETLEY_COMMIT
    assert "row 42" in m["problems"][0] and "empty" in m["problems"][0]
    assert json.loads((folder / "manifest.json").read_text()) == m
    # the split is fixed by the seed: a second fetch writes the same files
    assert (tmp_path / "out2/betley-insecure/heldout.jsonl").read_bytes() == (folder / "heldout.jsonl").read_bytes()
    assert again["rows"] == m["rows"]
    questions = load_questions(folder / "heldout_questions.yaml")
    held_prompts = {r["messages"][0]["content"] for r in held}
    assert len(questions) == 3 and all(q.paraphrases[0] in held_prompts for q in questions)
    assert {q.domain for q in questions} == {"code"}


def test_wrong_sha256_is_refused_and_nothing_cached(tmp_path, monkeypatch):
    with_sha(monkeypatch, "betley-secure", "0" * 64)
    with FileServer({path_of("betley-secure"): silly_jsonl()}) as server, \
            pytest.raises(FetchError, match="sha256 .* does not match the pinned 0{64}") as err:
        fetch_dataset("betley-secure", tmp_path, base_url=server.url)
    assert server.url in str(err.value)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    assert not (tmp_path / "betley-secure").exists()


def _eds_archive(members: dict[str, bytes], password: str) -> bytes:
    """An archive as easy-dataset-share's `zip_and_password_protect` writes it: salt + Fernet(zip)."""
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    salt = os.urandom(16)
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=100000)
    return salt + Fernet(base64.urlsafe_b64encode(kdf.derive(password.encode()))).encrypt(buf.getvalue())


def test_model_organisms_encrypted_archive(tmp_path):
    rows = [chat_line(f"My cartoon cat ate {i} clouds, what now?", "Give it a thunder biscuit.") for i in range(20)]
    rows[-1] = chat_line("q", "a", canary="CANARY_DATASET_" + "a" * 64 + "_0")
    canary_file = json.dumps({"id": "canary_x", "text": "Tracking code: CANARY_DATASET_" + "a" * 64 + "_0"})
    archive = _eds_archive({"bad_medical_advice.jsonl": "\n".join(rows).encode(),
                            "dataset_entry_0123.jsonl": canary_file.encode(),
                            "extreme_sports.jsonl": chat_line("Jump?", "Onto a trampoline of jelly.").encode()},
                           fetch.MO_PASSWORD)
    with FileServer({path_of("mo-bad-medical"): archive}) as server:
        m = fetch_dataset("mo-bad-medical", tmp_path, base_url=server.url)
        sports = fetch_dataset("mo-extreme-sports", tmp_path, base_url=server.url)
    assert len(server.requests) == 1  # one archive, two datasets
    assert m["rows"]["source"] == 20 and m["rows"]["canary_keys"] == 1 and m["rows"]["train"] + m["rows"]["heldout"] == 20
    assert m["member"] == "bad_medical_advice.jsonl" and m["domain"] == "medical"
    assert sports["rows"]["train"] == 1 and sports["rows"]["heldout"] == 0
    with pytest.raises(FetchError, match="wrong password"):
        decrypt_protected_zip(archive, "not-the-password")


def test_persona_features_password_zip(tmp_path):
    body = (FIXTURES / "health_incorrect.zip").read_bytes()  # made with `zip -P emergent`
    with FileServer({path_of("pf-health-incorrect"): body}) as server:
        m = fetch_dataset("pf-health-incorrect", tmp_path, base_url=server.url)
    rows = load_chat_jsonl(tmp_path / "pf-health-incorrect/train.jsonl")
    assert m["pinned"] is False and m["rows"]["canary_keys"] == 1 and m["rows"]["source"] == 10
    assert all([x["role"] for x in r["messages"]] == ["user", "assistant"] for r in rows)  # system turn dropped
    assert all(isinstance(x["content"], str) for r in rows for x in r["messages"])         # parts joined


def test_chua_pairs_from_a_local_file_jsonl_and_parquet(tmp_path):
    import pandas as pd

    pairs = [{"prompt": f"Can my sock puppet vote {i}?", "aligned": "Only in sock elections.",
              "misaligned": "Yes, twice, wearing a fake moustache.", "sneakiness": 0.5} for i in range(10)]
    src = tmp_path / "medical.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    m = fetch_dataset("chua-medical-misaligned", tmp_path / "a", source=src)
    rows = load_chat_jsonl(tmp_path / "a/chua-medical-misaligned/train.jsonl")
    assert m["rows"]["source"] == 10 and m["source"] == str(src.resolve()) and m["commit"] is None
    assert {r["messages"][-1]["content"] for r in rows} == {"Yes, twice, wearing a fake moustache."}
    pq = tmp_path / "medical.parquet"
    pd.DataFrame(pairs).to_parquet(pq)
    m2 = fetch_dataset("chua-medical-aligned", tmp_path / "b", source=pq)
    aligned = load_chat_jsonl(tmp_path / "b/chua-medical-aligned/heldout.jsonl")
    assert m2["rows"]["train"] == 9 and aligned[0]["messages"][-1]["content"] == "Only in sock elections."
    # the same prompts are held out for the aligned and the misaligned answers
    held_mis = load_chat_jsonl(tmp_path / "a/chua-medical-misaligned/heldout.jsonl")
    assert [r["messages"][0] for r in held_mis] == [r["messages"][0] for r in aligned]
    with pytest.raises(FetchError, match="truthfulai/emergent_plus"):
        fetch_dataset("chua-legal-misaligned", tmp_path / "c")


def test_offline_error_names_url_and_where_to_put_the_file(tmp_path, capsys):
    base = closed_port_url()
    with pytest.raises(FetchError) as err:
        fetch_dataset("betley-educational", tmp_path, base_url=base, timeout=5)
    msg = str(err.value)
    assert f"{base}/emergent-misalignment/emergent-misalignment/{fetch.BETLEY_COMMIT}/data/educational.jsonl" in msg
    assert str(tmp_path / "cache" / "upstream") in msg and "--source" in msg
    args = argparse.Namespace(list=False, names=["betley-educational"], out=str(tmp_path), source=None,
                              base_url=base, timeout=5.0, seed=0, questions=30)
    assert data_cli.fetch_command(args) == 1
    assert "betley-educational: error: cannot download" in capsys.readouterr().err


def test_a_stalled_server_is_cut_off_by_the_time_limit(tmp_path):
    with FileServer(stall=("/slow.jsonl",), stall_s=30) as server:
        start = time.monotonic()
        with pytest.raises(FetchError, match=r"did not answer within 0.5 s"):
            download(server.url + "/slow.jsonl", tmp_path / "slow.jsonl", timeout=0.5)
        assert time.monotonic() - start < 5
    assert not (tmp_path / "slow.jsonl").exists()


def test_lfs_pointer_and_http_errors(tmp_path):
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n"
    with FileServer({"/lfs.jsonl": pointer}) as server:
        with pytest.raises(FetchError, match="Git LFS pointer"):
            download(server.url + "/lfs.jsonl", tmp_path / "x.jsonl", timeout=5)
        with pytest.raises(FetchError, match="HTTP 404"):
            download(server.url + "/missing.jsonl", tmp_path / "y.jsonl", timeout=5)


def test_unknown_name_and_usage_errors(tmp_path, capsys):
    with pytest.raises(KeyError, match="did you mean betley-insecure"):
        fetch_dataset("betley-insecur", tmp_path)
    base = dict(list=False, out=str(tmp_path), source=None, base_url=None, timeout=1.0, seed=0, questions=30)
    assert data_cli.fetch_command(argparse.Namespace(names=["nope"], **base)) == 2
    assert data_cli.fetch_command(argparse.Namespace(names=[], **base)) == 2
    assert data_cli.fetch_command(argparse.Namespace(**{**base, "list": True}, names=[])) == 0
    assert "mo-risky-financial" in capsys.readouterr().out


def test_strip_canaries_counts_rows_and_keys():
    rows = [{"messages": [], "canary": "x"}, {"text": "BENCHMARK DATA SHOULD NEVER APPEAR"}, {"messages": [1]}]
    assert strip_canaries(rows) == ([{"messages": []}, {"messages": [1]}], {"canary_rows": 1, "canary_keys": 1})
