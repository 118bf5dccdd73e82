"""One writer per output folder: two ``seg predict`` or two ``seg run`` into the same folder at once would
interleave their files, so the second is refused with one line instead.

The lock is a file ``FOLDER/.seg.lock`` held with ``flock``: the kernel releases it when its process ends,
however it ends (``kill -9`` included), so a crashed run never leaves a folder locked. It holds the pid and
command line of its owner, for the refusal message, and is removed when the owner finishes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shlex
import sys
from pathlib import Path

from seg.core.errors import SegError

LOCK_NAME = ".seg.lock"


class FolderInUse(SegError):
    """Another process holds the folder's lock."""


def _owner(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "unknown process"


def _open_locked(path: Path, option: str, folder: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock; FolderInUse when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise FolderInUse(f"{option} {folder}: in use by another seg process ({_owner(path)}); wait for it "
                              "to finish or choose another folder") from None
        try:  # the previous owner may have removed the file between our open and our lock: lock the new one
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, option: str):
    """Hold ``folder``'s lock for the duration (creating the folder and its parents if needed).

    ``option`` names the folder in messages (``-o``, ``--out``). On exit the lock file is removed, and so are
    the folder and the parents this call created if they are left empty (a refused run leaves nothing).
    Raises FolderInUse, or SegError when the folder cannot be created.
    """
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists() and not p.is_symlink()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        fd = _open_locked(path, option, folder)
    except FolderInUse:
        raise
    except OSError as exc:
        _remove_if_empty(created)
        blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker else exc.strerror or str(exc)
        raise SegError(f"{option} {folder}: cannot write there ({why})") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {shlex.join(['seg', *sys.argv[1:]])}\n".encode())
    except OSError:
        pass  # the owner line is only for messages (a full disk must not stop a run here)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before releasing the lock, so a waiting process re-opens a fresh file
        os.close(fd)
        _remove_if_empty(created)


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
