"""The ``seg`` console script. It imports the command line (click, rich, torch, ...) inside a guard, so that a
missing or broken package is one line naming what to ``pip install`` even when it is one the command line itself
needs; ``seg.cli.main`` gives the same line for packages imported later by a command."""

from __future__ import annotations

import sys


def main(argv=None) -> None:
    """Run ``seg``; a package that cannot be imported is one line on stderr and exit code 2."""
    try:
        from seg.cli import main as cli_main
    except ImportError as exc:
        line = missing_package_line(exc)
        if line is None or "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        print(line, file=sys.stderr)
        raise SystemExit(2) from None
    cli_main(argv)


def missing_package_line(exc: ImportError) -> str | None:
    """``error: cannot import PACKAGE (why); install or repair it: pip install DIST``, or None when the failing
    import is seg's own (a bug, whose traceback helps)."""
    package = missing_package(exc)
    if package is None:
        return None
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"error: cannot import {package} ({detail}); install or repair it: pip install {install_name(package)}"


def missing_package(exc: ImportError) -> str | None:
    """The top-level package that is missing or broken, or None when the failing import is seg's own (a bug).

    ``exc.name`` names the module that could not be found or lacks a name; an error raised while a module was
    being imported (a broken install, a missing shared library) names none: the innermost module is the culprit.
    """
    if exc.name:
        top = exc.name.split(".")[0]
        return None if top == "seg" else top
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_globals.get("__name__") or "").split(".")[0])
        tb = tb.tb_next
    culprit = next((name for name in reversed(frames) if name not in ("", "importlib")), "seg")
    return None if culprit in ("seg", "__main__") else culprit


def install_name(module: str) -> str:
    """The distribution that provides the top-level module ``module`` (its own name when not installed)."""
    from importlib.metadata import packages_distributions

    return (packages_distributions().get(module) or [module])[0]
