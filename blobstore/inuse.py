"""Which files under a folder running processes have open or memory-mapped.

GC must not delete a blob a running process uses (a llama.cpp server has its GGUF
mapped). Processes are enumerated with psutil; on Linux each process's
``/proc/<pid>/maps`` and ``/proc/<pid>/fd`` are read directly (much faster than
psutil's ``memory_maps()``, which parses ``smaps``); elsewhere psutil's ``open_files()``
and ``memory_maps()`` are used. Processes we may not inspect (other users, when not
root) are skipped: spec/gc.md says so.

The calling process counts like any other: a program that embeds the store and has a
model mapped keeps it from its own ``gc()``. Only the store's own short reads of a blob
(``verify`` hashing it) are left out: they are registered with :func:`store_read` while
the file is open, and the scan of this process skips those descriptors. (If they counted,
a ``verify`` in one thread would make a ``gc`` in another keep whatever it happened to
be hashing: safe, but a lie in the report.)
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from blobstore.digest import Digest

__all__ = ["InUse", "files_in_use", "ollama_running", "store_read"]

class _OwnReads:
    """Descriptors of this process that the store itself opened for a short read."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}
        self.guard = threading.Lock()

    def forget_after_fork(self) -> None:
        """A forked child starts with no reads of its own, and a guard no parent
        thread holds."""
        self.__init__()  # type: ignore[misc]


_OWN = _OwnReads()
os.register_at_fork(after_in_child=_OWN.forget_after_fork)


@contextlib.contextmanager
def store_read(path: str) -> Iterator[BinaryIO]:
    """Open ``path`` for reading as the store's own transient handle (not "in use")."""
    f = open(path, "rb")  # noqa: SIM115  (closed below, after it is unregistered)
    fd = f.fileno()
    with _OWN.guard:
        _OWN.fds[fd] = _OWN.fds.get(fd, 0) + 1
    try:
        yield f
    finally:
        with _OWN.guard:
            n = _OWN.fds.pop(fd, 1) - 1
            if n > 0:
                _OWN.fds[fd] = n
        f.close()


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

    def of_blob(self, real_blobs: str, d: Digest) -> list[str]:
        """Who holds blob ``d`` (under either of its names) in the folder ``real_blobs``
        (a realpath)."""
        return [*self.holders.get(f"{real_blobs}/{d.filename}", ()),
                *self.holders.get(f"{real_blobs}/{d.legacy_filename}", ())]


def _linux_scan(prefixes: tuple[str, ...], pid: int, who: str, out: InUse,
                skip_fds: frozenset[str] = frozenset()) -> None:
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                for prefix in prefixes:
                    i = line.find(prefix)
                    if i >= 0:
                        path = line[i:].rstrip("\n")
                        path = path.removesuffix(" (deleted)")
                        out.add(path, who)
                        break
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
        if fd in skip_fds:
            continue
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith(prefixes):
                out.add(target, who)


def files_in_use(*folders: str) -> InUse:
    """Every file below the ``folders`` that some process (this one too) has open or
    mapped, except the store's own transient reads (``store_read``)."""
    import psutil

    prefixes = tuple(os.path.realpath(f).rstrip("/") + "/" for f in folders)
    out = InUse()
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "name"]):
        pid = proc.info["pid"]
        who = f"{proc.info.get('name') or '?'}[{pid}]"
        if sys.platform.startswith("linux"):
            if pid == me:
                with _OWN.guard:
                    skip = frozenset(str(fd) for fd in _OWN.fds)
                _linux_scan(prefixes, pid, who, out, skip)
            else:
                _linux_scan(prefixes, pid, who, out)
            continue
        try:  # pragma: no cover - non-Linux path
            for f in proc.open_files():
                if f.path.startswith(prefixes) and not (pid == me and f.fd in _OWN.fds):
                    out.add(f.path, who)
            for m in proc.memory_maps(grouped=True):
                if m.path.startswith(prefixes):
                    out.add(m.path, who)
        except (psutil.AccessDenied, psutil.ZombieProcess):  # pragma: no cover
            out.uninspectable += 1
        except psutil.NoSuchProcess:  # pragma: no cover
            continue
    return out


def ollama_running() -> str | None:
    """``ollama[<pid>]`` of a running Ollama process on this machine (its server pulls
    into the models folder at any time), else None. Processes in another PID namespace
    (a container blobctl does not share) are not seen."""
    import psutil

    for proc in psutil.process_iter(["name", "exe", "status"]):
        info = proc.info
        exe = info.get("exe") or ""
        if info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        if info.get("name") == "ollama" or os.path.basename(exe) == "ollama":
            return f"ollama[{proc.pid}]"
    return None
