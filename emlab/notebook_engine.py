"""emlab's papermill engine and the notebook time limits.

The engine (registered as ``"emlab"`` by :func:`register_engine`) saves the executed notebook
atomically with secret parameter values scrubbed, enforces the per-cell and per-notebook time limits
and drops nbclient's Output-widget echo; :func:`describe_failure` turns what a run raised into the
failing cell and a one-line message. :mod:`emlab.notebooks` runs notebooks through it.

>>> time_limits(60, None)  # doctest: +SKIP
(60.0, 86400.0)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emlab.run_env import scrub
from emlab.run_files import atomic_write_text

__all__ = [
    "CELL_TIMEOUT_ENV",
    "DEFAULT_CELL_TIMEOUT",
    "DEFAULT_NOTEBOOK_TIMEOUT",
    "ENGINE",
    "NOTEBOOK_TIMEOUT_ENV",
    "describe_failure",
    "kernel_start_timeout",
    "register_engine",
    "time_limits",
]

# ---------------------------------------------------------------------------------------------
# The papermill engine: atomic saves with secrets scrubbed, time limits, no Output-widget echo

ENGINE = "emlab"
#: Default time limits in seconds (``None``: no limit); the environment variables override them and
#: ``--cell-timeout`` / ``--notebook-timeout`` override both. A cell that runs longer fails and names itself.
CELL_TIMEOUT_ENV = "EMLAB_CELL_TIMEOUT"
NOTEBOOK_TIMEOUT_ENV = "EMLAB_NOTEBOOK_TIMEOUT"
DEFAULT_CELL_TIMEOUT = 6 * 3600.0
DEFAULT_NOTEBOOK_TIMEOUT = 24 * 3600.0
#: How long a notebook's kernel may take to start and answer (papermill's default, 60 s, was too short
#: for two sweep workers starting kernels on a loaded 2-core machine: "Kernel didn't respond in 60 seconds").
KERNEL_START_ENV = "EMLAB_KERNEL_START_TIMEOUT"
DEFAULT_KERNEL_START_TIMEOUT = 300.0


def kernel_start_timeout() -> float:
    """Seconds a kernel may take to start: ``EMLAB_KERNEL_START_TIMEOUT``, else 300 (``0``: the default).

    >>> kernel_start_timeout()  # doctest: +SKIP
    300.0
    """
    return _limit_from_env(KERNEL_START_ENV, DEFAULT_KERNEL_START_TIMEOUT) or DEFAULT_KERNEL_START_TIMEOUT


def _limit_from_env(name: str, default: float | None) -> float | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number of seconds (0 or 'none': no limit)") from None
    return value if value > 0 else None


def time_limits(cell: float | None = None, notebook: float | None = None) -> tuple[float | None, float | None]:
    """The per-cell and per-notebook time limits: the arguments, else the environment variables
    ``EMLAB_CELL_TIMEOUT`` / ``EMLAB_NOTEBOOK_TIMEOUT``, else 6 h and 24 h. ``0`` or less: no limit.

    >>> time_limits(60, None)  # doctest: +SKIP
    (60.0, 86400.0)
    """
    c = _limit_from_env(CELL_TIMEOUT_ENV, DEFAULT_CELL_TIMEOUT) if cell is None else (float(cell) if cell > 0 else None)
    n = (
        _limit_from_env(NOTEBOOK_TIMEOUT_ENV, DEFAULT_NOTEBOOK_TIMEOUT)
        if notebook is None
        else (float(notebook) if notebook > 0 else None)
    )
    return c, n


_ENGINE_READY = False


def register_engine() -> None:
    """Register emlab's papermill engine under the name :data:`ENGINE` (once per process)."""
    global _ENGINE_READY
    if _ENGINE_READY:
        return
    import nbformat
    from nbclient.output_widget import OutputWidget
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, NotebookExecutionManager, catch_nb_assignment, papermill_engines
    from papermill.log import logger

    class HeadlessOutputWidget(OutputWidget):
        """nbclient's Output-widget mimic, minus the state echo it sends to the kernel.

        Upstream, every output captured by ``with out: display(...)`` makes nbclient send a
        ``comm_msg`` on the shell socket from its iopub task while another task awaits the cell's
        ``execute_reply`` on that same socket; the reply's wake-up can then be lost (13 of 80 cells
        in the reproduction in docs/failures.md), and with no time limit the run waits forever. The
        kernel gets nothing useful from the echo (nbclient drops the kernel's answers to it), so it
        is not sent.
        """

        def _publish_msg(self, *args: Any, **kwargs: Any) -> None:  # noqa: D401 - see the class
            return None

    class Client(PapermillNotebookClient):
        def __init__(self, nb_man: Any, **kw: Any):
            super().__init__(nb_man, **kw)
            self.widget_registry = {"@jupyter-widgets/output": {"OutputModel": HeadlessOutputWidget}}

    class Manager(NotebookExecutionManager):
        """Saves the executed notebook atomically, with the secret parameter values scrubbed."""

        save_to: str | None = None
        secrets: tuple[str, ...] = ()
        progress: dict[str, Any] | None = None

        @catch_nb_assignment
        def save(self, **kwargs: Any) -> None:
            if self.save_to:
                atomic_write_text(self.save_to, scrub(nbformat.writes(self.nb), self.secrets))
            self.last_save_time = self.now()

        @catch_nb_assignment
        def cell_start(self, cell: Any, cell_index: int | None = None, **kwargs: Any) -> None:
            if self.progress is not None:
                self.progress["cell"] = cell_index
            super().cell_start(cell, cell_index, **kwargs)

    class Engine(NBClientEngine):
        @classmethod
        def execute_notebook(
            cls,
            nb: Any,
            kernel_name: str,
            output_path: str | None = None,
            progress_bar: bool = True,
            log_output: bool = False,
            autosave_cell_every: int = 30,
            save_to: str | None = None,
            secrets: Sequence[str] = (),
            progress: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> Any:
            nb_man = Manager(
                nb, output_path=None, progress_bar=progress_bar, log_output=log_output,
                autosave_cell_every=autosave_cell_every,
            )  # fmt: skip
            nb_man.save_to, nb_man.secrets, nb_man.progress = save_to, tuple(secrets), progress
            nb_man.notebook_start()
            try:
                cls.execute_managed_notebook(nb_man, kernel_name, log_output=log_output, **kwargs)
            finally:
                nb_man.cleanup_pbar()
                nb_man.notebook_complete()
            return nb_man.nb

        @classmethod
        def execute_managed_notebook(
            cls,
            nb_man: Any,
            kernel_name: str,
            log_output: bool = False,
            stdout_file: Any = None,
            stderr_file: Any = None,
            start_timeout: int = 60,
            execution_timeout: Any = None,
            cell_timeout: float | None = None,
            notebook_timeout: float | None = None,
            **kwargs: Any,
        ) -> Any:
            deadline: list[float] = []  # the notebook's clock starts with its first cell (kernel started)

            def limit(cell: Any) -> int | None:
                if notebook_timeout is not None and not deadline:
                    deadline.append(time.monotonic() + notebook_timeout)
                left = None if notebook_timeout is None else max(1.0, deadline[0] - time.monotonic())
                if nb_man.progress is not None:
                    nb_man.progress["limit"] = "notebook" if left is not None and (
                        cell_timeout is None or left < cell_timeout) else "cell"
                vals = [v for v in (cell_timeout, left) if v is not None]
                return math.ceil(min(vals)) if vals else None

            kwargs.pop("input_path", None)
            kwargs.pop("timeout", None)
            client = Client(
                nb_man, kernel_name=kernel_name, timeout_func=limit, startup_timeout=start_timeout, log=logger,
                log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file, **kwargs,
            )  # fmt: skip
            return client.execute()

    papermill_engines.register(ENGINE, Engine)
    _ENGINE_READY = True



# ---------------------------------------------------------------------------------------------
# Failures


def _cell_at(index: int | None, output: Path) -> tuple[int | None, str]:
    """1-based position in the source notebook of the executed copy's cell ``index``, and its first line."""
    if index is None:
        return None, ""
    source = ""
    try:
        import nbformat

        cells = [  # papermill may add error banner cells to a saved copy after a failure
            c
            for c in nbformat.read(str(output), as_version=4).cells
            if "papermill-error-cell-tag" not in c.get("metadata", {}).get("tags", [])
        ]
        injected = sum("injected-parameters" in c.get("metadata", {}).get("tags", []) for c in cells[:index])
        source = cells[index].source
    except Exception:  # noqa: BLE001 - the position is a convenience
        injected = 0
    first = next((line.strip() for line in source.splitlines() if line.strip()), "")
    return index - injected + 1, first


def _failed_cell(err: Exception, output: Path) -> tuple[int | None, str]:
    """1-based position of the failing cell in the source notebook and its first source line."""
    index = getattr(err, "cell_index", None)
    cell, first = _cell_at(index, output)
    if not first:
        source = str(getattr(err, "source", "") or "")
        first = next((line.strip() for line in source.splitlines() if line.strip()), "")
    return cell, first


def describe_failure(e: BaseException, nb: Path, output: Path, progress: dict[str, Any],
                     limits: tuple[float | None, float | None]) -> tuple[int | None, str]:
    """The failing cell and a one-line message for an exception raised while executing ``nb``.

    ``progress`` is what the engine recorded (the cell running, which limit applied), ``limits`` the
    (cell, notebook) time limits in seconds."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    if isinstance(e, CellTimeoutError | DeadKernelError | KeyboardInterrupt) or getattr(e, "cell_index", None) is None:
        cell, first = _cell_at(progress.get("cell"), output)
    else:
        cell, first = _failed_cell(e, output)  # type: ignore[arg-type]
    where = f" in cell {cell} (`{first[:80]}`)" if cell is not None else ""
    if isinstance(e, CellTimeoutError):
        if progress.get("limit") == "notebook":
            what = f"the notebook time limit ({limits[1]:.0f} s; --notebook-timeout, EMLAB_NOTEBOOK_TIMEOUT) ran out"
        else:
            what = f"the cell ran past its time limit ({limits[0]:.0f} s; --cell-timeout, EMLAB_CELL_TIMEOUT)"
        return cell, f"{nb} stopped{where}: {what}; the kernel was shut down"
    if isinstance(e, DeadKernelError):
        return cell, f"{nb} failed{where}: the kernel died (killed, out of memory, or a crash in native code)"
    if isinstance(e, KeyboardInterrupt):
        return cell, f"{nb} interrupted{where}"
    ename = getattr(e, "ename", None) or type(e).__name__
    evalue = getattr(e, "evalue", None)
    if evalue is None:
        evalue = (str(e).strip().splitlines() or [""])[-1]
    return cell, f"{nb} failed{where}: {ename}: {evalue}"
