"""Open every notebook in a real JupyterLab with headless Chromium, run it in smoke mode, and check the widgets.

    pip install -e '.[browser]'            # playwright (the Python package; no browser download)
    python bench/check_jupyterlab.py        # every notebooks/*.ipynb, quickstart first
    python bench/check_jupyterlab.py notebooks/01_directions.ipynb --keep

What it does, per notebook: copies it into a temporary folder with a cell injected after the
``parameters`` cell (``smoke = True``, ``out_dir = <tmp>/runs/<stem>``), starts ``jupyter lab`` there
(no browser, no token, a free port on 127.0.0.1), opens the notebook in Chromium (the system one,
``/usr/bin/chromium``, through playwright), runs Run > Run All Cells from the menu, waits until the
kernel is idle and no cell is queued, saves, and checks:

- every code cell ran and the saved notebook holds no error output;
- each emlab widget the notebook calls (``sample_browser``, ``steering_explorer``, ``run_comparer``)
  rendered in the output area (``.emlab-sample-browser`` ... with its sliders, dropdowns, selects), and
  no output shows "Error displaying widget";
- each one responds to the real controls: the sample browser's question dropdown and its score-range
  slider (keyboard on the slider handle) change the match count and the listed samples; the
  steering explorer's layer and alpha sliders (keyboard) followed by a click on Generate change the
  generated table's header to the new layer and alpha; the run comparer's run and metric selections
  change the metrics table (and its Plotly chart is drawn).

Prints one line per notebook and exits 1 if anything failed (2: JupyterLab or Chromium did not start).
Notebooks run one after the other in one server; all runs go under one ``runs/`` folder, so the
run comparer of 04_evaluation sees the runs of the notebooks opened before it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from emlab.notebooks import find_notebooks

ROOT = Path(__file__).resolve().parent.parent
WIDGETS = {  # what a notebook calls -> the CSS class emlab.widgets gives the widget's top box
    "sample_browser": "emlab-sample-browser",
    "steering_explorer": "emlab-steering-explorer",
    "run_comparer": "emlab-run-comparer",
}
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"


@dataclass
class Result:
    name: str
    opened: bool = False
    cells: int = 0
    ran: int = 0
    errors: int = 0
    widgets: dict[str, str] = field(default_factory=dict)  # widget -> what rendered
    responded: dict[str, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.opened
            and self.ran == self.cells
            and not self.errors
            and not self.problems
            and all(self.responded.values())
        )

    def line(self) -> str:
        found = ", ".join(f"{k} ({v})" for k, v in self.widgets.items()) or "none"
        resp = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in self.responded.items()) or "n/a"
        text = (
            f"{'OK  ' if self.ok else 'FAIL'} {self.name:28s} opened {'yes' if self.opened else 'NO'} | "
            f"cells run {self.ran}/{self.cells} | errors {self.errors} | widgets {found} | "
            f"responded {resp} | {self.seconds:.0f} s"
        )
        return text + "".join(f"\n       - {p}" for p in self.problems)


# ---------------------------------------------------------------------------------------------
# The notebooks and the server


def expected_widgets(nb: nbformat.NotebookNode) -> list[str]:
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return [name for name in WIDGETS if re.search(rf"\b{name}\w*\(", code)]


def prepare(src: Path, dest_dir: Path, runs: Path) -> nbformat.NotebookNode:
    """Copy ``src`` into ``dest_dir`` with smoke-mode parameters injected after its parameters cell
    (papermill's own injection, as ``emlab run`` does)."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = load_notebook_node(str(src))
    if not any("parameters" in c.metadata.get("tags", []) for c in nb.cells):
        raise ValueError(f"{src} has no cell tagged 'parameters'")
    nb = parameterize_notebook(nb, {"smoke": True, "out_dir": str(runs / src.stem)})
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    nbformat.write(nb, dest_dir / src.name)
    return nb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root: Path, work: Path, port: int, log: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        JUPYTER_RUNTIME_DIR=str(work / "runtime"),
        PYTHONUNBUFFERED="1",
    )
    jupyter = Path(sys.executable).with_name("jupyter")
    cmd = [
        str(jupyter) if jupyter.exists() else "jupyter",
        "lab",
        "--no-browser",
        f"--port={port}",
        "--ServerApp.ip=127.0.0.1",
        "--ServerApp.port_retries=0",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.open_browser=False",
        f"--LabApp.user_settings_dir={work / 'settings'}",
        f"--LabApp.workspaces_dir={work / 'workspaces'}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers often run as root
        cmd.append("--allow-root")
    write_lab_settings(work / "settings")
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_lab(proc)
    raise RuntimeError(f"jupyter lab did not answer on port {port} within 120 s; see {log}")


def stop_lab(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # our own process group: the server and its kernels
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def api(port: int, path: str, method: str = "GET") -> object:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


def shutdown_kernels(port: int, timeout: float = 30) -> None:
    """End every session and kernel of the server (ours), and wait until none is left."""
    for s in api(port, "/api/sessions") or []:
        api(port, f"/api/sessions/{s['id']}", "DELETE")
    for k in api(port, "/api/kernels") or []:
        api(port, f"/api/kernels/{k['id']}", "DELETE")
    deadline = time.time() + timeout
    while (api(port, "/api/kernels") or api(port, "/api/sessions")) and time.time() < deadline:
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# In the browser


def wait_for(page, js: str, timeout: float, what: str, arg=None):
    """Poll ``js`` (a function of ``arg``) until it returns a truthy value; raise TimeoutError with ``what``."""
    deadline = time.time() + timeout
    while True:
        value = page.evaluate(js, arg)
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


STATE_JS = f"""() => {{
  const panel = document.querySelector('{PANEL}');
  if (!panel) return null;
  const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(e => e.textContent.trim());
  const ind = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  return {{prompts, status: ind ? ind.getAttribute('data-status') : null}};
}}"""


def start_kernel(page, port: int, name: str, timeout: float = 120) -> None:
    """Accept the "Select Kernel" dialog if JupyterLab asks, and wait until the notebook's kernel is idle."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        dialog = page.locator(".jp-Dialog .jp-mod-accept")
        if dialog.count():
            dialog.first.click()
        sessions = [s for s in api(port, "/api/sessions") or [] if s.get("path", "").endswith(f"notebooks/{name}")]
        idle = any((s.get("kernel") or {}).get("execution_state") == "idle" for s in sessions)
        if idle and not page.locator(".jp-Dialog").count():
            wait_for(
                page,
                f"() => {{ const e = document.querySelector('{PANEL} .jp-Notebook-ExecutionIndicator');"
                " return e && e.getAttribute('data-status') === 'idle'; }",
                60,
                "the kernel indicator",
            )
            return
        time.sleep(0.5)
    raise TimeoutError(f"no idle kernel after {timeout:.0f} s")


def write_lab_settings(settings: Path) -> None:
    """No news or update pop-ups over the notebook."""
    path = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))


def click_run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


def run_all(page, timeout: float) -> None:
    """Run > Run All Cells; wait until some cell ran, the kernel is idle and no cell is queued."""
    started = "() => { const s = (" + STATE_JS + ")(); return s && s.prompts.some(p => /[0-9*]/.test(p)); }"
    for attempt in range(3):
        click_run_all(page)
        try:
            wait_for(page, started, 30, "the first cell to start")
            break
        except TimeoutError:
            if attempt == 2:
                raise
    deadline = time.time() + timeout
    quiet_since = None
    while True:
        st = page.evaluate(STATE_JS)
        busy = st is None or st["status"] != "idle" or any("*" in p for p in st["prompts"])
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since > 2.0:  # idle, nothing queued, for two seconds
            return
        if time.time() > deadline:
            raise TimeoutError(f"cells still running after {timeout:.0f} s: prompts {st and st['prompts']}")
        time.sleep(0.5)


def save_and_read(page, path: Path, timeout: float = 30) -> nbformat.NotebookNode:
    before = path.stat().st_mtime_ns
    page.locator(f"{PANEL} .jp-Notebook").click(position={"x": 5, "y": 5})  # command mode, focus
    page.keyboard.press("Escape")
    page.keyboard.press("Control+s")
    deadline = time.time() + timeout
    while path.stat().st_mtime_ns == before:
        if time.time() > deadline:
            raise TimeoutError("the notebook was not saved")
        time.sleep(0.25)
    time.sleep(0.5)
    return nbformat.read(path, as_version=4)


def text(page, selector: str) -> str:
    loc = page.locator(selector)
    return loc.first.inner_text() if loc.count() else ""


def changed(page, selector: str, before: str, timeout: float = 60, contains: str | None = None) -> bool:
    js = """([sel, before, contains]) => {
      const e = document.querySelector(sel); if (!e) return false;
      const t = e.innerText; return t !== before && (!contains || t.includes(contains)) && !t.includes('generating ');
    }"""
    try:
        wait_for(page, js, timeout, f"{selector} to change", [selector, before, contains])
        return True
    except TimeoutError:
        return False


def count(page, selector: str) -> int:
    return page.locator(selector).count()


def describe(page, box: str) -> str:
    parts = {
        "sliders": f"{box} .widget-slider, {box} .widget-hslider",
        "dropdowns": f"{box} .widget-dropdown",
        "selects": f"{box} .widget-select-multiple",
        "buttons": f"{box} .widget-button",
        "plots": f"{box} .js-plotly-plot",
    }
    return ", ".join(f"{n} {count(page, s)}" for n, s in parts.items() if count(page, s))


def check_sample_browser(page, res: Result, box: str) -> bool:
    out = f"{box} .emlab-output"
    sel = page.locator(f"{box} .emlab-question select")
    options = sel.locator("option").all_inner_texts()
    if len(options) < 2:
        res.problems.append("sample_browser: the question dropdown has no question")
        return False
    count_before, out_before = text(page, f"{box} .emlab-count"), text(page, out)
    sel.select_option(index=1)
    ok_dropdown = changed(page, f"{box} .emlab-count", count_before, 30) or changed(page, out, out_before, 5)
    if not ok_dropdown:
        res.problems.append(
            f"sample_browser: choosing question {options[1].replace(chr(160), ' ')!r} did not change the samples"
        )
    # the score range: move the upper handle to the lower one with the keyboard (End/Home are noUiSlider keys)
    readout = f"{box} .emlab-range .widget-readout"
    r0, c0 = text(page, readout), text(page, f"{box} .emlab-count")
    handle = page.locator(f"{box} .emlab-range .noUi-handle").last
    handle.focus()
    for _ in range(3):
        page.keyboard.press("PageDown")
    ok_slider = changed(page, readout, r0, 15)
    if not ok_slider:
        res.problems.append("sample_browser: the range slider did not move with the keyboard")
    else:
        page.keyboard.press("Home")
        ok_slider = changed(page, f"{box} .emlab-count", c0, 30)
        if not ok_slider:
            res.problems.append(f"sample_browser: the range {text(page, readout)!r} did not change the count {c0!r}")
    return ok_dropdown and ok_slider


def check_steering_explorer(page, res: Result, box: str) -> bool:
    out = f"{box} .emlab-output"
    if not changed(page, out, "", 60):
        res.problems.append("steering_explorer: no generated answers shown")
        return False
    before = text(page, out)
    moved = []
    for name in ("alpha", "layer"):
        readout = f"{box} .emlab-{name} .widget-readout"
        r0 = text(page, readout)
        page.locator(f"{box} .emlab-{name} .noUi-handle").first.focus()
        page.keyboard.press("ArrowRight")
        if not changed(page, readout, r0, 15):  # the layer may already be the last one
            page.keyboard.press("ArrowLeft")
        if changed(page, readout, r0, 15):
            moved.append(name)
    if "alpha" not in moved:
        res.problems.append("steering_explorer: the alpha slider did not move with the keyboard")
        return False
    alpha, layer = text(page, f"{box} .emlab-alpha .widget-readout"), text(page, f"{box} .emlab-layer .widget-readout")
    page.locator(f"{box} .emlab-generate").first.click()
    want = f"layer {layer}, alpha {float(alpha):g}"
    if not changed(page, out, before, 120, contains=want):
        res.problems.append(
            f"steering_explorer: Generate did not show answers for {want!r} (output starts {text(page, out)[:120]!r})"
        )
        return False
    if not count(page, f"{out} table"):
        res.problems.append("steering_explorer: the answers table is missing")
        return False
    return True


def check_run_comparer(page, res: Result, box: str) -> bool:
    table = f"{box} .emlab-table"
    ok = True
    runs = page.locator(f"{box} .emlab-runs select")
    metrics = page.locator(f"{box} .emlab-metrics select")
    names = metrics.locator("option").all_inner_texts()
    run_names = runs.locator("option").all_inner_texts()
    if not count(page, f"{box} .js-plotly-plot"):
        res.problems.append("run_comparer: no Plotly chart drawn")
        ok = False
    before = text(page, table)
    if len(names) < 2:
        res.problems.append(f"run_comparer: only {len(names)} metric(s) to choose from")
        return False
    pick = [n for n in names if n not in before][:1] or names[-1:]
    metrics.select_option(label=pick)
    if not changed(page, table, before, 30, contains=pick[0]):
        res.problems.append(f"run_comparer: selecting metric {pick[0]!r} did not change the table")
        ok = False
    if len(run_names) > 1:
        before = text(page, table)
        runs.select_option(label=run_names[:1])
        if not changed(page, table, before, 30):
            res.problems.append(f"run_comparer: selecting run {run_names[0]!r} alone did not change the table")
            ok = False
    return ok


CHECKS = {
    "sample_browser": check_sample_browser,
    "steering_explorer": check_steering_explorer,
    "run_comparer": check_run_comparer,
}


def check_notebook(
    page, port: int, root: Path, src: Path, runs: Path, timeout: float, shots: Path | None = None
) -> Result:
    res = Result(src.name)
    t0 = time.time()
    try:
        nb = prepare(src, root / "notebooks", runs)
        want = expected_widgets(nb)
        res.cells = sum(c.cell_type == "code" for c in nb.cells)
        page.goto(f"http://127.0.0.1:{port}/lab/tree/notebooks/{src.name}?reset", wait_until="domcontentloaded")
        wait_for(page, f"() => document.querySelectorAll('{PANEL} .jp-Cell').length > 0", 120, "the notebook")
        start_kernel(page, port, src.name)
        time.sleep(1.0)  # let the panel connect to the kernel
        res.opened = True
        run_all(page, timeout)
        saved = save_and_read(page, root / "notebooks" / src.name)
        code = [c for c in saved.cells if c.cell_type == "code"]
        res.ran = sum(c.execution_count is not None for c in code)
        for i, c in enumerate(saved.cells):
            for o in c.get("outputs", []):
                if o.output_type == "error":
                    res.errors += 1
                    res.problems.append(
                        f"cell {i + 1} (`{c.source.splitlines()[0] if c.source else ''}`): {o.ename}: {o.evalue}"[:300]
                    )
        broken = page.locator(f"{PANEL} .jp-OutputArea-output", has_text="Error displaying widget").count()
        if broken:
            res.problems.append(f"{broken} output(s) show 'Error displaying widget'")
        for name in want:
            box = f"{PANEL} .jp-OutputArea .{WIDGETS[name]}"
            try:
                page.wait_for_selector(box, timeout=30_000)
            except Exception:  # noqa: BLE001 - reported below
                res.widgets[name] = "NOT rendered"
                res.responded[name] = False
                res.problems.append(f"{name}: not rendered (no {WIDGETS[name]} in an output area)")
                continue
            res.widgets[name] = describe(page, box) or "rendered"
            try:
                res.responded[name] = CHECKS[name](page, res, box)
                if shots is not None:
                    page.locator(box).first.scroll_into_view_if_needed()
                    page.locator(box).first.screenshot(path=str(shots / f"{src.stem}-{name}.png"))
            except Exception as e:  # noqa: BLE001 - one widget's failure must not hide the others
                res.responded[name] = False
                res.problems.append(f"{name}: {type(e).__name__}: {e}"[:300])
    except Exception as e:  # noqa: BLE001 - reported in the notebook's line
        res.problems.append(f"{type(e).__name__}: {e}"[:400])
    finally:
        try:
            page.goto("about:blank")
            shutdown_kernels(port)
        except Exception:  # noqa: BLE001 - the next notebook reports its own trouble
            pass
    res.seconds = time.time() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium"))
    ap.add_argument("--timeout", type=float, default=900, help="seconds for one notebook's cells (default 900)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (executed copies, runs, lab log)")
    ap.add_argument(
        "--screenshots",
        action="store_true",
        help="save PNGs of each notebook and each widget in the folder (with --keep)",
    )
    args = ap.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("playwright is missing: pip install -e '.[browser]' (uses the system Chromium, no download)")
        return 2
    notebooks = [p.resolve() for p in args.notebooks] or find_notebooks(ROOT / "notebooks")
    work = Path(tempfile.mkdtemp(prefix="emlab-lab-check-"))
    root, runs = work / "lab", work / "lab" / "runs"
    (root / "notebooks").mkdir(parents=True)
    port = free_port()
    print(f"JupyterLab on port {port}, folder {work}, Chromium {args.chromium}", flush=True)
    try:
        proc = start_lab(root, work, port, work / "jupyter-lab.log")
    except RuntimeError as e:
        print(f"FAIL {e}")
        return 2
    results: list[Result] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=args.chromium,
                headless=True,
                args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
            )
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            for nb in notebooks:
                res = check_notebook(page, port, root, nb, runs, args.timeout, work if args.screenshots else None)
                if args.screenshots:
                    page.screenshot(path=str(work / f"{nb.stem}.png"))
                results.append(res)
                print(res.line(), flush=True)
            browser.close()
    finally:
        stop_lab(proc)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r.name for r in results if not r.ok]
    total = sum(r.seconds for r in results)
    print(
        f"{len(results) - len(failed)}/{len(results)} notebooks passed in {total:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + (f"; kept {work}" if args.keep else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
