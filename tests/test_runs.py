import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from emlab import runs
from emlab.runs import REDACTED, atomic_open, atomic_write_json, atomic_write_text, load_run, redact, start_run


class Boom(RuntimeError):
    pass


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- atomic writes --------------------------------------------------------------------------


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old content\n")
    with pytest.raises(Boom), atomic_open(path) as f:
        f.write("new content that never finishes")
        raise Boom
    assert path.read_text() == "old content\n"
    assert leftovers(tmp_path) == []


def test_atomic_write_cleans_up_when_the_final_replace_fails(tmp_path, monkeypatch):
    path = atomic_write_json(tmp_path / "m.json", {"a": 1})

    def failing_replace(src, dst):
        raise Boom

    monkeypatch.setattr(runs.os, "replace", failing_replace)
    with pytest.raises(Boom):
        atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert leftovers(tmp_path) == []


def test_atomic_write_json_converts_values(tmp_path):
    np = pytest.importorskip("numpy")

    @dataclass
    class Cfg:
        lr: float
        path: Path

    atomic_write_json(tmp_path / "x.json", {"cfg": Cfg(0.1, Path("a/b")), "v": np.float32(0.5), "nan": float("nan")})
    assert json.loads((tmp_path / "x.json").read_text()) == {"cfg": {"lr": 0.1, "path": "a/b"}, "v": 0.5, "nan": None}


# --- start / load ---------------------------------------------------------------------------


def test_secrets_are_redacted_and_counts_kept():
    config = {
        "openai_api_key": "abc",
        "hf_token": "hf_xyz",
        "apiKey": "q",
        "judge": {"client_secret": "s", "password": "p", "base_url": "http://x", "extra": ["sk-abcdef"]},
        "note": "uses sk-" + "a" * 40 + " inline",
        "max_new_tokens": 600,
        "key_layer": 12,
        "tokenizer": "Qwen/Qwen2.5-0.5B-Instruct",
        "credentials": {"user": "me", "retries": 3},
    }
    out = redact(config)
    assert out["openai_api_key"] == out["hf_token"] == out["apiKey"] == REDACTED
    assert out["judge"] == {
        "client_secret": REDACTED,
        "password": REDACTED,
        "base_url": "http://x",
        "extra": [REDACTED],
    }
    assert out["note"] == REDACTED
    assert (out["max_new_tokens"], out["key_layer"], out["tokenizer"]) == (600, 12, "Qwen/Qwen2.5-0.5B-Instruct")
    assert out["credentials"] == {"user": REDACTED, "retries": 3}
    assert config["openai_api_key"] == "abc"  # input untouched


def test_start_run_writes_redacted_config_and_env(tmp_path):
    run = start_run(tmp_path / "run1", {"model": "toy", "api_key": "sk-live-secret", "data": {"split_seed": 3}}, seed=7)
    on_disk = (tmp_path / "run1" / "config.json").read_text()
    assert "sk-live-secret" not in on_disk
    assert json.loads(on_disk) == {"model": "toy", "api_key": REDACTED, "data": {"split_seed": 3}}
    env = json.loads((tmp_path / "run1" / "env.json").read_text())
    assert env["seed"] == 7 and env["config_seeds"] == {"data.split_seed": 3}
    assert env["name"] == "run1" and env["python"].count(".") == 2 and env["platform"]
    assert {"torch", "transformers", "peft", "trl", "nnsight", "openai", "emlab"} <= set(env["packages"])
    assert env["packages"]["emlab"]
    assert set(env["git"]) == {"commit", "dirty"} and "T" in env["started"]
    assert run.seed == 7 and run.name == "run1"
    assert random.random() == random.Random(7).random()  # Python's random was seeded


def test_start_run_refuses_existing_run_unless_overwrite(tmp_path):
    run = start_run(tmp_path / "r", {"a": 1}, name="first")
    run.log_metrics({"old": 1})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        start_run(tmp_path / "r", {"a": 2})
    run2 = start_run(tmp_path / "r", {"a": 2}, overwrite=True)
    assert load_run(tmp_path / "r").metrics == {} and run2.config == {"a": 2}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not an emlab run folder"):
        start_run(tmp_path / "other", {}, overwrite=True)
    assert (tmp_path / "other" / "config.json").exists()


def test_git_state_reports_commit_and_dirty(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("1")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    state = runs.git_state(tmp_path)
    assert len(state["commit"]) == 40 and state["dirty"] is False
    (tmp_path / "f.txt").write_text("2")
    assert runs.git_state(tmp_path)["dirty"] is True
    assert runs.git_state(tmp_path / "nowhere") == {"commit": None, "dirty": None}


def test_metrics_records_round_trip(tmp_path):
    run = start_run(tmp_path / "r", {"lr": 1e-4})
    run.log_metrics({"em": {"general": 0.1}, "loss": 2.0})
    assert run.log_metrics({"em": {"medical": 0.3}, "loss": 1.5}) == {
        "em": {"general": 0.1, "medical": 0.3},
        "loss": 1.5,
    }
    run.write_records("samples/general", [{"q": "hi", "a": "hé"}])
    run.write_records("judged.jsonl", [{"score": 1}, {"score": None}])
    back = load_run(tmp_path / "r")
    assert back.config == {"lr": 1e-4} and back.metrics == run.metrics and back.env["name"] == "r"
    assert back.record_names == ["judged", "samples/general"]
    assert back.records == {"judged": [{"score": 1}, {"score": None}], "samples/general": [{"q": "hi", "a": "hé"}]}
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run(tmp_path)


def test_write_records_keeps_old_file_when_rows_fail(tmp_path):
    run = start_run(tmp_path / "r", {})
    run.write_records("s", [{"i": 0}])

    def rows():
        yield {"i": 1}
        raise Boom

    with pytest.raises(Boom):
        run.write_records("s", rows())
    assert run.read_records("s") == [{"i": 0}]
    assert leftovers(run.dir) == []


def test_append_records_repairs_an_interrupted_append(tmp_path):
    run = start_run(tmp_path / "r", {})
    path = run.append_records("s", [{"i": 0}, {"i": 1}])
    run.append_records("s", [{"i": 2}])
    with path.open("ab") as f:
        f.write(b'{"i": 3, "trunc')  # a crash in the middle of a write
    with pytest.warns(UserWarning, match="incomplete last record"):
        assert [r["i"] for r in run.read_records("s")] == [0, 1, 2]
    with pytest.warns(UserWarning, match="removing an incomplete last record"):
        run.append_records("s", [{"i": 4}])
    assert [r["i"] for r in run.read_records("s")] == [0, 1, 2, 4]
    with path.open("ab") as f:
        f.write(b'{"i": 5}')  # complete record without its newline is kept
    run.append_records("s", [{"i": 6}])
    assert [r["i"] for r in run.read_records("s")] == [0, 1, 2, 4, 5, 6]


def test_path_stays_inside_the_run(tmp_path):
    run = start_run(tmp_path / "r", {})
    assert run.path("a/b.txt") == tmp_path / "r" / "a" / "b.txt" and (tmp_path / "r" / "a").is_dir()
    for bad in ("../x", "/etc/passwd", ""):
        with pytest.raises(ValueError, match="inside the run folder"):
            run.path(bad)


# --- figures --------------------------------------------------------------------------------


def test_save_figure_writes_html_and_notes_missing_chromium_once(tmp_path, monkeypatch):
    go = pytest.importorskip("plotly.graph_objects")
    monkeypatch.setattr(runs, "_png_failure", None)
    calls = []

    def fail(self, *a, **k):
        calls.append(1)
        raise RuntimeError("Kaleido requires Google Chrome to be installed.")

    monkeypatch.setattr(go.Figure, "to_image", fail)
    run = start_run(tmp_path / "r", {})
    fig = go.Figure(go.Scatter(y=[1, 3, 2]))
    with pytest.warns(UserWarning, match="apt-get install -y chromium"):
        assert run.save_figure(fig, "curve") == [run.dir / "curve.html"]
    run.save_figure(fig, "curve2.html")
    html = (run.dir / "curve.html").read_text()
    assert "<html>" in html and 'src="https://cdn.plot.ly' not in html and len(html) > 1_000_000  # plotly.js inlined
    assert calls == [1]  # the PNG attempt is not repeated
    notes = load_run(run.dir).env["notes"]
    assert len(notes) == 1 and "apt-get install -y chromium" in notes[0] and "Google Chrome" in notes[0]
    assert load_run(run.dir).figures == ["curve", "curve2"]


def test_save_figure_writes_png_when_export_works(tmp_path, monkeypatch):
    go = pytest.importorskip("plotly.graph_objects")
    monkeypatch.setattr(runs, "_png_failure", None)
    monkeypatch.setattr(go.Figure, "to_image", lambda self, format: b"\x89PNG fake")
    run = start_run(tmp_path / "r", {})
    written = run.save_figure(go.Figure(), "fig")
    assert written == [run.dir / "fig.html", run.dir / "fig.png"]
    assert (run.dir / "fig.png").read_bytes() == b"\x89PNG fake" and run.env["notes"] == []
    assert run.save_figure(go.Figure(), "html_only", png=False) == [run.dir / "html_only.html"]
    assert not (run.dir / "html_only.png").exists()
    with pytest.raises(TypeError, match="plotly or matplotlib"):
        run.save_figure(object(), "x")


def test_run_folder_bookkeeping_functions(tmp_path):
    from emlab.runs import MANIFEST_FILE, STATUS_FILE, begin_manifest, finish_manifest, read_json_safe, write_status

    assert read_json_safe(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{oops")
    assert read_json_safe(tmp_path / "bad.json") is None
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json_safe(tmp_path / "ok.json") == {"a": 1}

    run = tmp_path / "run"
    run.mkdir()
    (run / "user.txt").write_text("mine")
    write_status(run, "running")
    st = read_json_safe(run / STATUS_FILE)
    assert st["status"] == "running" and st["finished"] is None and st["started"] and st["pid"] == os.getpid()
    write_status(run, "failed", "killed")
    st2 = read_json_safe(run / STATUS_FILE)
    assert st2["status"] == "failed" and st2["reason"] == "killed" and st2["started"] == st["started"] and st2["finished"]

    begin_manifest(run, keep=False)
    (run / "metrics.json").write_text("{}")
    (run / "figures").mkdir()
    (run / "figures" / "a.html").write_text("x")
    begin_manifest(run, keep=True)  # resuming keeps the first start: the new files stay emlab's
    finish_manifest(run)
    m = read_json_safe(run / MANIFEST_FILE)
    assert m["preexisting"] == ["user.txt"] and m["written"] == ["figures/a.html", "metrics.json"] and m["finished"]


def test_package_versions_names_and_fallbacks():
    from emlab.runs import PACKAGES, package_versions
    from emlab.version import __version__

    v = package_versions()
    assert list(v) == list(PACKAGES) and v["torch"] and v["emlab"]
    assert package_versions(["no-such-package-xyz", "emlab"]) == {"no-such-package-xyz": None,
                                                                  "emlab": v["emlab"]}
    assert v["emlab"] in (__version__, package_versions(["emlab"])["emlab"])
