"""Run folders: what every ``seg run`` writes so it can be reproduced from the folder alone.

``config.toml`` (the fully resolved experiment; ``--experiment RUN/config.toml`` reruns it), ``command.txt``,
``log.txt``, ``metrics.csv``/``metrics.json``, ``checkpoint_latest.pt`` and (fine-tuning) ``checkpoint_best.pt``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from seg.core import distributed
from seg.core.config import Experiment, experiment_toml, load_experiment
from seg.core.errors import SegError
from seg.core.io import write_text
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
