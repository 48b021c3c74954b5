"""Saving figures (HTML, and static PNG through kaleido with a time limit) and the figure record:
:func:`record` stores each figure's data in ``<run>/figure_data.json``, :func:`regenerate` and
:func:`load_figures` redraw from it without recomputing anything."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from emlab.plots.defences import defence_scatter, table2
from emlab.plots.figures import (
    cosine_heatmap,
    em_bars,
    kl_vs_norm,
    loss_vs_norm,
    quadrant_scatter,
    stability_curves,
    steering_sweep,
    training_curves,
)
from emlab.published import load_paper_table
from emlab.runs import atomic_open, atomic_write_json, atomic_write_text, to_jsonable

__all__ = ["FIGURE_DATA", "FIGURE_TIMEOUT_S", "PLOTS", "load_figures", "record", "regenerate", "save"]

#: File in a run folder that holds the data of every recorded figure (see :func:`record`).
FIGURE_DATA = "figure_data.json"
_STATIC_HINT = "static PNG needs Chromium: apt-get install -y chromium; wrote HTML only"
_static_failed: str | None = None  # set after the first failed static export; later ones are skipped
_server_started = False

#: Plot functions by name: the ``kind`` of :func:`record` and of ``figure_data.json`` entries.
PLOTS: dict[str, Callable[..., go.Figure]] = {
    f.__name__: f
    for f in (
        defence_scatter,
        table2,
        quadrant_scatter,
        steering_sweep,
        cosine_heatmap,
        loss_vs_norm,
        stability_curves,
        kl_vs_norm,
        training_curves,
        em_bars,
    )
}


# ---------------------------------------------------------------------------------------------
# Saving and the figure record


#: Seconds one static export may take (``$EMLAB_FIGURE_TIMEOUT``): kaleido 1.x can wait forever for a
#: browser tab (its render timeout does not cover that wait), which once hung a test run for 12 minutes.
FIGURE_TIMEOUT_S = 120.0


def _kill_chromium() -> None:
    """Stop kaleido's persistent server without waiting for its (possibly stuck) thread, and its Chromium."""
    global _server_started
    _server_started = False
    with contextlib.suppress(Exception):
        from kaleido import _global_server

        # its atexit hook joins the server thread: with a stuck thread that would hang the interpreter's exit
        _global_server._initialized = False  # noqa: SLF001 - kaleido offers no non-blocking close
    with contextlib.suppress(Exception):
        import psutil

        for child in psutil.Process().children(recursive=True):
            if "chrom" in child.name().lower():
                child.kill()


def _to_image(fig: go.Figure, fmt: str, timeout: float) -> bytes:
    """``plotly.io.to_image`` in a daemon thread, abandoned (TimeoutError) after ``timeout`` seconds."""
    import queue
    import threading

    import plotly.io as pio

    box: queue.Queue = queue.Queue(maxsize=1)

    def work() -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "kopts ignored" once the persistent server runs
                box.put(pio.to_image(fig, format=fmt, scale=2 if fmt == "png" else 1))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box.put(e)

    threading.Thread(target=work, name="emlab-static-export", daemon=True).start()
    try:
        out = box.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"static export did not finish in {timeout:g} s") from None
    if isinstance(out, BaseException):
        raise out
    return out


def _static(fig: go.Figure, fmt: str) -> bytes | None:
    """Static image bytes through kaleido, or None (after one printed message) without Chromium.

    Every export has a time limit (:data:`FIGURE_TIMEOUT_S`); a stuck export restarts Chromium and is
    tried once more, and a second one gives HTML only for the rest of the process, with a message.
    """
    global _static_failed, _server_started
    if _static_failed is not None:
        return None
    timeout = float(os.environ.get("EMLAB_FIGURE_TIMEOUT", FIGURE_TIMEOUT_S))
    for attempt in (1, 2):
        try:
            data = _to_image(fig, fmt, timeout)
            break
        except TimeoutError as e:
            _kill_chromium()
            if attempt == 1:
                print(f"emlab: {e}; restarting Chromium and trying once more", file=sys.stderr)
                continue
            _static_failed = f"{e} twice: wrote HTML only from now on (EMLAB_FIGURE_TIMEOUT sets the limit)"
            print(_static_failed, file=sys.stderr)
            return None
        except Exception as e:  # noqa: BLE001 - any kaleido / Chromium failure
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            _static_failed = f"{_STATIC_HINT} [{type(e).__name__}: {reason}]"
            print(_static_failed, file=sys.stderr)
            return None
    if not _server_started:  # keep one Chromium for later exports (about 0.2 s each instead of 3 s)
        _server_started = True
        with contextlib.suppress(Exception):
            import kaleido

            kaleido.start_sync_server(silence_warnings=True)
    return data


def save(fig: go.Figure, path: str | os.PathLike, formats: Sequence[str] = ("html", "png")) -> list[Path]:
    """Write ``fig`` to ``path.html`` (self-contained: plotly.js embedded) and ``path.png`` (kaleido).

    Other formats: ``svg``, ``pdf``, ``jpeg``, ``webp``. When static export fails (no Chromium), one
    message is printed and only the HTML is written. Returns the files written.

    >>> save(em_bars({"sft": 0.2}), "figures/em")  # doctest: +SKIP
    [PosixPath('figures/em.html'), PosixPath('figures/em.png')]
    """
    path = Path(path)
    if path.suffix.lstrip(".") in ("html", "png", "svg", "pdf", "jpeg", "jpg", "webp"):
        path = path.with_suffix("")
    written = []
    for fmt in formats:
        out = path.with_name(f"{path.name}.{fmt}")
        if fmt == "html":
            written.append(atomic_write_text(out, fig.to_html(include_plotlyjs=True, full_html=True)))
            continue
        data = _static(fig, fmt)
        if data is not None:
            with atomic_open(out, "wb") as f:
                f.write(data)
            written.append(out)
    return written


def _jsonable(data: Mapping[str, Any]) -> dict[str, Any]:
    def conv(v: Any) -> Any:
        if isinstance(v, pd.DataFrame):
            return v.to_dict("records")
        if isinstance(v, pd.Series):
            return v.to_dict()
        if isinstance(v, Mapping):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        return v

    data = dict(data)
    if data.get("paper") is True or isinstance(data.get("paper"), str | os.PathLike):
        data["paper"] = load_paper_table(None if data["paper"] is True else data["paper"])
    # Through JSON and back, so the figure drawn now is exactly the one `emlab figures` redraws.
    return json.loads(json.dumps(to_jsonable(conv(data)), allow_nan=False))


def _run_dir(run_dir: Any) -> Path:
    return Path(getattr(run_dir, "dir", run_dir))


def record(
    run_dir: str | os.PathLike, name: str, kind: str, *, formats: Sequence[str] = ("html", "png"), **data: Any
) -> go.Figure:
    """Draw figure ``kind`` (a name in :data:`PLOTS`) from ``data``, save it as ``<run_dir>/figures/<name>``
    and store ``{"kind", "data"}`` under ``name`` in ``<run_dir>/figure_data.json``, so that
    ``emlab figures`` can redraw it later without recomputing anything. Returns the figure.

    ``data`` must be JSON-storable (DataFrames are stored as row lists; ``paper=True`` stores the
    published rows themselves). ``run_dir`` may be a path or an :class:`emlab.runs.Run`.

    >>> record(out_dir, "em", "em_bars", metrics={"sft": 0.2, "kl": 0.02})  # doctest: +SKIP
    """
    if kind not in PLOTS:
        raise KeyError(f"unknown figure kind {kind!r}; choose one of {sorted(PLOTS)}")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"figure name must be a plain file stem such as 'em_rates', got {name!r}")
    stored = _jsonable(data)
    fig = PLOTS[kind](**stored)
    d = _run_dir(run_dir)
    save(fig, d / "figures" / name, formats)
    _update_figure_data(d, name, {"kind": kind, "data": stored})
    return fig


def _update_figure_data(run_dir: Path, name: str, spec: dict[str, Any]) -> None:
    path = run_dir / FIGURE_DATA
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(ImportError, OSError):  # lock the folder for the read-modify-write (POSIX)
            import fcntl

            fd = os.open(run_dir, os.O_RDONLY)
            stack.callback(os.close, fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
        specs = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        specs[name] = spec
        atomic_write_json(path, specs)


def regenerate(
    run_dir: str | os.PathLike, *, names: Sequence[str] | None = None, formats: Sequence[str] = ("html", "png")
) -> list[Path]:
    """Redraw every figure recorded in ``<run_dir>/figure_data.json`` (or only ``names``); return the files.

    >>> regenerate("runs/02_defences/20250101-120000")  # doctest: +SKIP
    [PosixPath('runs/02_defences/20250101-120000/figures/tradeoff.html'), ...]
    """
    d = _run_dir(run_dir)
    path = d / FIGURE_DATA
    if not path.exists():
        return []
    specs = json.loads(path.read_text(encoding="utf-8"))
    written: list[Path] = []
    for name, spec in specs.items():
        if names is not None and name not in names:
            continue
        kind = spec.get("kind")
        if kind not in PLOTS:
            raise KeyError(f"{path}: figure {name!r} has unknown kind {kind!r}; known: {sorted(PLOTS)}")
        try:
            fig = PLOTS[kind](**spec.get("data", {}))
        except Exception as e:
            raise RuntimeError(f"{path}: redrawing figure {name!r} ({kind}) failed: {type(e).__name__}: {e}") from e
        written += save(fig, d / "figures" / name, formats)
    return written


def load_figures(run_dir: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, go.Figure]:
    """The figures recorded in a run folder, redrawn from ``figure_data.json`` (nothing is saved).

    Notebooks end with ``for fig in load_figures(out_dir).values(): fig.show()``.

    >>> figs = load_figures("runs/00_em_organism")   # doctest: +SKIP
    >>> list(figs)                                    # doctest: +SKIP
    ['em_rates']
    """
    d = _run_dir(run_dir)
    path = d / FIGURE_DATA
    if not path.exists():
        return {}
    specs = json.loads(path.read_text(encoding="utf-8"))
    return {name: PLOTS[spec["kind"]](**spec.get("data", {})) for name, spec in specs.items()
            if names is None or name in names}
