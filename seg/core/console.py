"""Where the core reports to people: one rich console, progress bars that ``--quiet`` turns off, and the
run folder's log file."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

console = Console(stderr=True)
log = logging.getLogger("seg")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn progress bars and informational messages off (errors still print)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    """Whether ``--quiet`` is on."""
    return _quiet


def info(message: str) -> None:
    """Print a message for the user (unless quiet) and log it (as plain text, the console markup removed)."""
    log.info(Text.from_markup(message).plain)
    if not _quiet:
        console.print(message)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None):
    """A rich progress bar; yields ``advance(n=1, total=None, **fields)`` (``total`` sets the bar's length when
    it was not known at the start). Silent when quiet."""
    if _quiet:
        yield lambda n=1, total=None, **fields: None
        return
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, total: int | None = None, **fields) -> None:
            status = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=n, status=status, **({} if total is None else {"total": total}))

        yield advance


@contextlib.contextmanager
def log_to(path: Path):
    """Also write the ``seg`` logger's records to ``path`` (the run folder's ``log.txt``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    previous = log.level
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(previous)
