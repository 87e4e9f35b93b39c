"""Pick the best catalog model for a machine (spec/catalog.md, "recommend").

The figures used:

* **RAM budget** = available RAM (``psutil.virtual_memory().available``) minus a
  2 GiB reserve for the system and other programs;
* **GPU memory** = free memory of every NVIDIA GPU (``nvidia-smi
  --query-gpu=memory.free``) when that tool is present, else none; llama.cpp can put
  layers there, so it adds to the memory budget;
* **free disk** of the store's filesystem: a model that is not in the store yet must fit.

``--ram SIZE`` plans for another machine: SIZE replaces the available RAM (the reserve
still applies) and this machine's GPU and disk are not counted.

Memory budget = ``max(0, RAM - reserve) + GPU`` (spec/catalog.md, word for word).

Choice: among the models whose ``ram_required`` fits the memory budget (and whose file
fits on disk), the recommended ones first, then the largest (by ``ram_required``). When
nothing fits, :class:`NothingFits` names the smallest model's needs.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blobstore.units import human_bytes
from catalog.catalog import Catalog, CatalogEntry
from catalog.errors import NothingFits

__all__ = ["RESERVE", "Machine", "Recommendation", "fits", "gpu_free_memory", "machine",
           "recommend"]

RESERVE = 2 << 30  # RAM left for the system and other programs


@dataclass(frozen=True)
class Machine:
    ram_available: int        # bytes (before the reserve)
    ram_total: int | None
    gpu_free: int             # bytes, 0 when none detected
    gpu_source: str           # "nvidia-smi", "none detected", "not counted (--ram)"
    disk_free: int | None     # bytes free for the store; None = not checked
    reserve: int = RESERVE
    planned: bool = False     # --ram: figures for another machine

    @property
    def memory_budget(self) -> int:
        return max(0, self.ram_available - self.reserve) + self.gpu_free

    def to_json(self) -> dict[str, Any]:
        return {"ram_available": self.ram_available, "ram_total": self.ram_total,
                "reserve": self.reserve, "gpu_free": self.gpu_free,
                "gpu_source": self.gpu_source, "disk_free": self.disk_free,
                "memory_budget": self.memory_budget, "planned": self.planned}


def gpu_free_memory(timeout: float = 5.0) -> tuple[int, str]:
    """Free GPU memory in bytes and where it came from (``nvidia-smi``), or 0."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0, "none detected"
    try:
        out = subprocess.run([exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout, check=True).stdout
        mib = sum(int(line.strip()) for line in out.splitlines() if line.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0, "none detected (nvidia-smi failed)"
    return mib << 20, "nvidia-smi"


def machine(store_root: Path | None, *, ram: int | None = None) -> Machine:
    """This machine's figures (or, with ``ram``, a planned machine's)."""
    if ram is not None:
        return Machine(ram, None, 0, "not counted (--ram)", None, planned=True)
    import psutil

    vm = psutil.virtual_memory()
    gpu, src = gpu_free_memory()
    disk: int | None = None
    if store_root is not None:
        probe = store_root
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        disk = shutil.disk_usage(probe).free
    return Machine(int(vm.available), int(vm.total), gpu, src, disk)


def fits(entry: CatalogEntry, m: Machine, *, present: bool = False) -> bool:
    """True if ``entry`` fits the memory budget and (unless present) the free disk."""
    if entry.ram_required > m.memory_budget:
        return False
    return present or m.disk_free is None or entry.file_size <= m.disk_free


@dataclass
class Recommendation:
    entry: CatalogEntry
    machine: Machine
    candidates: list[CatalogEntry]
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.entry.to_json(), "machine": self.machine.to_json(),
                "fitting": [e.id for e in self.candidates], "reasons": self.reasons}


def _figures(m: Machine) -> str:
    ram = (f"{human_bytes(m.ram_available)} RAM {'planned' if m.planned else 'available'}"
           f" - {human_bytes(m.reserve)} reserve")
    gpu = (f"GPU {human_bytes(m.gpu_free)} free ({m.gpu_source})" if m.gpu_free
           else f"GPU: {m.gpu_source}")
    return f"{ram} + {gpu} = {human_bytes(m.memory_budget)} for the model"


def recommend(cat: Catalog, m: Machine, *, present: set[str] | None = None,
              entries: list[CatalogEntry] | None = None) -> Recommendation:
    """The best entry for ``m``; raises NothingFits (with the smallest model's needs).

    ``present``: ids already in the store (their file needs no disk space).
    """
    present = present or set()
    pool = entries if entries is not None else cat.entries
    fitting = [e for e in pool if fits(e, m, present=e.id in present)]
    if not fitting:
        if not pool:
            raise NothingFits("no catalog model matches the filters",
                              hint="'blobctl catalog' lists the tiers and tags")
        small = min(pool, key=lambda e: (e.ram_required, e.file_size))
        disk = (f", {human_bytes(m.disk_free)} free disk" if m.disk_free is not None else "")
        # say what is short (found from outside: on a nearly full disk, with memory
        # to spare, the hint said "close programs to free memory")
        if any(e.ram_required <= m.memory_budget for e in pool):
            hint = ("free disk space on the store's filesystem, or use a store on "
                    "another one (--store)")
        elif m.disk_free is not None and all(e.file_size > m.disk_free for e in pool):
            hint = ("close programs to free memory and free disk space on the store's "
                    "filesystem, or plan for another machine with --ram")
        else:
            hint = "close programs to free memory, or plan for another machine with --ram"
        raise NothingFits(
            f"no catalog model fits: the smallest, {small.id}, needs "
            f"{human_bytes(small.ram_required)} of memory and {human_bytes(small.file_size)} "
            f"of disk; this machine has {_figures(m)}{disk}", hint=hint)
    fitting.sort(key=lambda e: (e.recommended, e.ram_required, e.file_size), reverse=True)
    best = fitting[0]
    why = [_figures(m)]
    if m.disk_free is not None:
        why.append(f"{human_bytes(m.disk_free)} free disk in the store")
    why.append(f"{len(fitting)} of {len(pool)} catalog models fit")
    if best.recommended:
        why.append(f"{best.id} is the largest recommended model that fits "
                   f"(needs {human_bytes(best.ram_required)}, file "
                   f"{human_bytes(best.file_size)})")
    else:
        why.append(f"no recommended model fits; {best.id} is the largest that does "
                   f"(needs {human_bytes(best.ram_required)})")
    return Recommendation(best, m, fitting, why)
