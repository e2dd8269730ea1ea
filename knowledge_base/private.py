"""Private files: the data directory holds customers' conversations, credentials and the models the
team trained, so nothing in it is readable by other accounts on the machine.

Directories are created ``0700`` and files ``0600``, whatever the process umask says (a library
caller's umask is usually ``022``); the CLI also sets ``umask 077`` (:func:`restrict_umask`), so
files written by third-party code (``save_pretrained``, SQLite's ``-wal``/``-shm``) are private too.
Files written through :mod:`knowledge_base.atomic` are ``0600`` already (``mkstemp``).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = ["DIR_MODE", "FILE_MODE", "private_dir", "private_file", "restrict_umask"]

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def restrict_umask() -> int:
    """``umask 077`` for this process (files 0600, directories 0700 by default); returns the old one."""
    return os.umask(0o077)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700; an existing one that others can read
    is narrowed to 0700 (it is SupportBot's own folder), with a log line saying so."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.chmod(path, DIR_MODE)  # mkdir's mode is masked by the umask, never widened: set it exactly
        return path
    _narrow(path, DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 if it is missing (before SQLite opens it: SQLite gives its
    ``-wal`` and ``-shm`` files the database file's mode); narrow an existing one to 0600."""
    path = Path(path)
    if not path.parent.is_dir():
        private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        _narrow(path, FILE_MODE)
    else:
        os.close(fd)
        os.chmod(path, FILE_MODE)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            _narrow(side, FILE_MODE)
    return path


def _narrow(path: Path, mode: int) -> None:
    try:
        current = stat.S_IMODE(path.stat().st_mode)
        if current & 0o077:
            os.chmod(path, mode)
            log.info("%s was readable by other accounts (mode %o): now %o", path, current, mode)
    except OSError as exc:  # not ours to change (another owner): say so, keep going
        log.warning("could not make %s private (%s)", path, exc)
