"""A static (PNG) export that never finishes is stopped by a time limit: HTML is still written, a message
says why, and neither the run nor the interpreter's exit hangs (kaleido 1.x can wait forever for a tab)."""

import shutil
import subprocess
import sys
import textwrap
import threading

import pytest

from emlab import plots
from emlab.plots import storage


def test_a_stuck_export_is_abandoned_and_html_kept(tmp_path, monkeypatch, capsys):
    import plotly.io as pio

    calls = []

    def stuck(*a, **k):
        calls.append(1)
        threading.Event().wait()  # never returns

    monkeypatch.setattr(pio, "to_image", stuck)
    monkeypatch.setattr(storage, "_static_failed", None)
    monkeypatch.setenv("EMLAB_FIGURE_TIMEOUT", "0.3")
    written = plots.save(plots.em_bars({"sft": 0.2}), tmp_path / "em")
    assert [p.name for p in written] == ["em.html"]
    assert len(calls) == 2  # tried once more after restarting Chromium
    err = capsys.readouterr().err
    assert "did not finish in 0.3 s" in err and "HTML only" in err
    assert plots.save(plots.em_bars({"sft": 0.2}), tmp_path / "em2") == [tmp_path / "em2.html"]
    assert len(calls) == 2  # later exports are not tried again


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium for kaleido")
def test_a_real_kaleido_server_stuck_on_a_tab_does_not_hang_the_process(tmp_path):
    script = textwrap.dedent(f"""
        import asyncio, os
        from emlab import plots
        fig = plots.em_bars({{"sft": 0.2}})
        print([p.name for p in plots.save(fig, r"{tmp_path}/a")], flush=True)   # starts the persistent server
        import kaleido.kaleido as kk
        async def never(self):
            await asyncio.Event().wait()
        kk.Kaleido._get_kaleido_tab = never                                    # the observed hang
        os.environ["EMLAB_FIGURE_TIMEOUT"] = "5"
        print([p.name for p in plots.save(fig, r"{tmp_path}/b")], flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "['a.html', 'a.png']"
    assert lines[1] == "['b.html']"
    assert "did not finish in 5 s" in proc.stderr
