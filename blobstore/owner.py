"""Whose are the files blobctl makes in a store it runs on as root (spec/store-layout.md,
"Owners").

Ollama's Linux service keeps its models in ``/usr/share/ollama/.ollama/models``, owned
by the service's user, and people run ``sudo blobctl`` on it. Folders and files root
made there stayed root's (found from outside): the service user's blobctl could then
no longer pull (its lock file, its state database, an interrupted download were root's),
and Ollama could make no model folder in a ``manifests/.../library`` root had made, nor
rewrite a manifest root had written. So, run as root, blobctl hands each entry it makes
to the owner and group of the folder it is made in, when that folder is not root's (as
npm did for its cache): a store of the ``ollama`` user stays the ``ollama`` user's. A
store that is root's, or blobctl run as anyone else, changes nothing.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = ["hand_over", "make_dirs"]

log = logging.getLogger("blobctl.store")


def _heir(folder: str | os.PathLike[str]) -> tuple[int, int] | None:
    """The owner and group to give a new entry of ``folder``: the folder's, when this
    process runs as root and the folder is someone else's; else None."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def hand_over(path: str | os.PathLike[str], fd: int | None = None, *,
              folder: str | os.PathLike[str] | None = None) -> None:
    """Give ``path`` (a file or folder this process made, or ``fd``, open on it) to the
    owner of its folder when running as root (see the module's text). Only what root owns
    is changed: a file another user made stays theirs. Never raises: an owner that cannot
    be set (a file system without owners) leaves the entry as it is.

    With ``fd``, only the file ``path`` names itself: a regular file of one link, the
    same one ``fd`` is open on. The folder's owner can put anything at a name in their
    folder; a symlink there to ``/etc/shadow``, or a hardlink of it, must not get it
    handed to them (found by review). Without ``fd``, ``lchown`` changes the entry
    itself, never what a symlink points at. ``folder``: the folder whose owner gets it,
    if not ``path``'s own (a temp file renamed into ``folder`` later)."""
    heir = _heir(folder if folder is not None else os.path.dirname(os.path.abspath(path)))
    if heir is None:
        return
    try:
        if fd is not None:
            st, named = os.fstat(fd), os.lstat(path)
            if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != 0
                    or (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino)):
                return
            os.fchown(fd, *heir)
        elif os.lstat(path).st_uid == 0:
            os.lchown(path, *heir)
    except OSError as exc:
        log.debug("cannot give %s to uid %d: %s", path, heir[0], exc)


def make_dirs(path: Path) -> None:
    """``path.mkdir(parents=True, exist_ok=True)``, each folder it makes handed over."""
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    except FileNotFoundError:
        if path.parent == path:
            raise
        make_dirs(path.parent)
        make_dirs(path)  # (again: its folder is there now)
        return
    hand_over(path)
