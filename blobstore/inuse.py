"""Which files under a folder running processes have open or memory-mapped.

GC must not delete a blob a running process uses (a llama.cpp server has its GGUF
mapped). Processes are enumerated with psutil; on Linux each process's
``/proc/<pid>/maps`` and ``/proc/<pid>/fd`` are read directly (much faster than
psutil's ``memory_maps()``, which parses ``smaps``); elsewhere psutil's ``open_files()``
and ``memory_maps()`` are used. Processes we may not inspect (other users, when not
root) are skipped: spec/gc.md says so.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

__all__ = ["InUse", "files_in_use"]


@dataclass
class InUse:
    """path -> list of ``"name[pid]"`` of processes holding it."""

    holders: dict[str, list[str]] = field(default_factory=dict)
    uninspectable: int = 0

    def add(self, path: str, who: str) -> None:
        lst = self.holders.setdefault(path, [])
        if who not in lst:
            lst.append(who)

    def __contains__(self, path: object) -> bool:
        return path in self.holders


def _linux_scan(prefix: str, pid: int, who: str, out: InUse) -> None:
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                i = line.find(prefix)
                if i >= 0:
                    path = line[i:].rstrip("\n")
                    path = path.removesuffix(" (deleted)")
                    out.add(path, who)
    except (FileNotFoundError, ProcessLookupError):
        return
    except PermissionError:
        out.uninspectable += 1
        return
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError):
        return
    except PermissionError:
        out.uninspectable += 1
        return
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith(prefix):
                out.add(target, who)


def files_in_use(folder: str) -> InUse:
    """Every file below ``folder`` that some process has open or mapped."""
    import psutil

    prefix = os.path.realpath(folder).rstrip("/") + "/"
    out = InUse()
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "name"]):
        pid = proc.info["pid"]
        if pid == me:
            continue
        who = f"{proc.info.get('name') or '?'}[{pid}]"
        if sys.platform.startswith("linux"):
            _linux_scan(prefix, pid, who, out)
            continue
        try:  # pragma: no cover - non-Linux path
            for f in proc.open_files():
                if f.path.startswith(prefix):
                    out.add(f.path, who)
            for m in proc.memory_maps(grouped=True):
                if m.path.startswith(prefix):
                    out.add(m.path, who)
        except (psutil.AccessDenied, psutil.ZombieProcess):  # pragma: no cover
            out.uninspectable += 1
        except psutil.NoSuchProcess:  # pragma: no cover
            continue
    return out
