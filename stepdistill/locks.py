"""One writer per folder: an exclusive OS lock on the folder, held for the life of a run (or a make-pairs job).

The lock is the operating system's (``flock`` on the folder itself, so no file is added to it), so it dies with the
process: a killed run leaves no stale lock, and a second command into the same folder fails at once, naming it.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path


class FolderInUse(RuntimeError):
    """Another process holds the folder; the message names it."""


@contextmanager
def hold_folder(folder, what: str = "a run"):
    """Hold ``folder`` exclusively until the block ends; :class:`FolderInUse` at once if another process holds it.

    A folder made here is removed again if the block leaves it empty (a job that failed before writing anything
    leaves no trace). ``what`` names, in the error, what the other process is doing there."""
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FolderInUse(f"{folder} is in use by {what} in another process; wait for it to end or choose "
                              "another folder") from None
        try:
            yield folder
        finally:
            if made and not any(folder.iterdir()):
                folder.rmdir()
    finally:
        os.close(fd)  # closing the descriptor releases the lock
