"""Run folders: what every ``seg run`` writes so it can be reproduced from the folder alone.

``config.toml`` (the fully resolved experiment; ``--experiment RUN/config.toml`` reruns it), ``command.txt``,
``log.txt``, ``metrics.csv``/``metrics.json``, ``checkpoint_latest.pt`` and (fine-tuning) ``checkpoint_best.pt``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
from pathlib import Path

from seg.core import distributed
from seg.core.config import Experiment, experiment_toml, load_experiment
from seg.core.checkpoint import load_checkpoint
from seg.core.errors import CheckpointError, SegError
from seg.core.io import remove_stale_temporaries, write_text
from seg.core.lock import folder_lock
from seg.core.train import LATEST

CONFIG = "config.toml"


def open_run_dir(out: Path, exp: Experiment | None, resume: bool) -> Experiment:
    """Create (or, with ``resume``, reopen) the run folder ``out``; return the experiment it runs.

    A resumed run uses the folder's own ``config.toml``, so it continues exactly what was started.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SegError(f"--out {out}: is a file; give a folder for the run")
    if resume:
        if not (out / LATEST).exists():
            raise SegError(f"--out {out}: nothing to resume (no {LATEST})")
        return load_experiment(str(out / CONFIG))
    if (out / LATEST).exists():
        raise SegError(f"--out {out}: already holds a run; use --resume to continue it or another --out")
    if distributed.is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_text(experiment_toml(exp), out / CONFIG)
            write_text(shlex.join(sys.argv) + "\n", out / "command.txt")
        except OSError as exc:
            raise SegError(f"--out {out}: cannot write there ({exc.strerror})") from None
    return exp


@contextlib.contextmanager
def claim_run_dir(out: Path, resume: bool, kind: str):
    """Around a whole ``seg run`` of stage ``kind`` ("pretrain", "finetune") into ``out``: hold the folder's lock
    (a second run into the same folder at once is refused with one line, see ``seg.core.lock``); refuse a
    ``resume`` with nothing to resume, or of another stage's run, before anything is written; and if a new run
    is refused, remove what it wrote (``discarded_if_refused``). Under torchrun only rank 0 (``RANK``) locks."""
    out = Path(out)
    if (out.exists() and not out.is_dir()) or os.environ.get("RANK", "0") != "0":
        lock = contextlib.nullcontext()  # a file in the way is open_run_dir's one-line error
    else:
        lock = folder_lock(out, "--out")
    with lock:
        if resume:
            check_resumable(out, kind)
            remove_stale_temporaries(out)  # a killed run may have died mid-write
        with discarded_if_refused(out, resume):
            yield


def check_resumable(out: Path, kind: str) -> None:
    """Refuse to resume ``out`` when it holds no readable latest checkpoint of stage ``kind``."""
    path = Path(out) / LATEST
    if not path.is_file():
        raise SegError(f"--out {out}: nothing to resume (no {LATEST})")
    found = load_checkpoint(path, mmap=True).get("kind")
    if found != kind:
        raise CheckpointError(f"{path}: a {found} checkpoint; cannot resume a {kind} run")


@contextlib.contextmanager
def discarded_if_refused(out: Path, resume: bool):
    """Around a new run into ``out``: if it stops with a user error (``SegError``: a bad dataset, checkpoint...)
    before writing its first checkpoint, remove what it wrote, so a refused run leaves nothing behind.

    Only what this run created goes: the folder (and missing parents) if it did not exist, else the entries it
    added to an existing folder. Resumed runs, checkpointed runs and crashes (tracebacks) keep everything.
    """
    out = Path(out)
    created = [] if resume else [p for p in (out, *out.parents) if not p.exists() and not p.is_symlink()]
    before = set(os.listdir(out)) if not resume and not created and out.is_dir() else None
    try:
        yield
    except SegError:
        if (created or before is not None) and distributed.is_main() and out.is_dir() and not (out / LATEST).exists():
            if created:
                shutil.rmtree(out, ignore_errors=True)
                for parent in created[1:]:
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            else:
                for name in set(os.listdir(out)) - before:
                    path = out / name
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
        raise
