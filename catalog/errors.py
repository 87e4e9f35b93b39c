"""Errors raised by the catalog package (under ``blobstore.BlobctlError``).

The CLI maps them by family (spec/cli.md, "Exit codes")::

    BlobctlError                        (blobstore.errors)
    ├── InvalidInput
    │   └── CatalogError                a catalog file that does not parse or validate (4)
    ├── NotFound
    │   └── NothingFits                 recommend: no catalog model fits the machine (3)
    ├── StoreError
    │   └── StoreBusy
    │       └── RunNotSaved             bench measured a run, the history lock was busy (9)
    └── MissingExtra                    an optional dependency is not installed (12)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blobstore.errors import BlobctlError, InvalidInput, NotFound, StoreBusy

if TYPE_CHECKING:
    from blobstore.benchlog import BenchRun

__all__ = ["CatalogError", "MissingExtra", "NothingFits", "RunNotSaved"]


class CatalogError(InvalidInput):
    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"catalog {source}: {reason}",
                         hint="see spec/catalog.md for the entry format")
        self.source = source
        self.reason = reason


class NothingFits(NotFound):
    """No catalog model fits the memory (or disk) budget."""


class MissingExtra(BlobctlError):
    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs {module}, which is not installed; "
            f"install it with: pip install 'blobctl[{extra}]'",
            hint="llama-cpp-python builds from source (~5 min); "
                 "CMAKE_ARGS=-DLLAVA_BUILD=OFF makes it faster")
        self.module = module
        self.extra = extra


class RunNotSaved(StoreBusy):
    """``benchmark`` measured ``run`` but could not add it to the history (its lock was
    held longer than the timeout): the caller still has the figures to show."""

    def __init__(self, run: BenchRun, cause: StoreBusy) -> None:
        super().__init__(cause.what, cause.timeout)
        self.message = f"the run was not saved: {cause.message}"
        self.args = (self.message,)
        self.hint = ("another blobctl bench is saving its run (or holds the lock); "
                     "run the benchmark again when it has finished")
        self.run = run
