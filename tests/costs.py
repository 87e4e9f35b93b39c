"""Count what an operation costs in machine-independent units: walks of a folder,
scans of ``/proc``, files renamed into a folder. Python's audit hooks (PEP 578) see
every ``os.scandir``/``os.listdir``/``os.rename`` this process makes; nothing of ours is
patched. A hook cannot be removed, so one is installed once and counts only inside
``counting()``."""

from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_active: list[Counter[tuple[str, str]]] = []
_lock = threading.Lock()
_installed: list[bool] = []  # (once per process)


def _norm(arg: Any) -> str:
    try:
        return os.path.normpath(os.fsdecode(arg))
    except TypeError:
        return ""


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _active or event not in ("os.scandir", "os.listdir", "os.rename"):
        return
    size = 0
    if event == "os.rename":  # (os.replace raises it too) counted by target folder
        key = (event, os.path.dirname(_norm(args[1])))
        try:  # (the hook runs before the rename: the file is still at its source)
            fd = args[2] if isinstance(args[2], int) and args[2] >= 0 else None
            size = os.stat(args[0], dir_fd=fd).st_size
        except (OSError, TypeError, IndexError):
            size = 0
    else:
        key = (event, _norm(args[0]) if args else "")
    with _lock:
        for c in _active:
            c[key] += 1
            if size:
                c[("bytes", key[1])] += size


@contextmanager
def counting() -> Iterator[Counter[tuple[str, str]]]:
    """Counts (event, folder) while the block runs: ("os.scandir", "/x/manifests"),
    ("os.listdir", "/proc"), ("os.rename", "/x/.blobctl/leases") and ("bytes",
    "/x/.blobctl/leases"): the size of the files renamed into that folder."""
    if not _installed:
        sys.addaudithook(_hook)
        _installed.append(True)
    c: Counter[tuple[str, str]] = Counter()
    _active.append(c)
    try:
        yield c
    finally:
        _active.remove(c)
