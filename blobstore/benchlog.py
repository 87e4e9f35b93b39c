"""Benchmark history in the store's state folder (spec/catalog.md, "bench"); written by
``catalog.bench``, read by ``blobctl bench --history`` and the server's web page.

``.blobctl/bench/<sha256 of the model's key>.json`` holds ``{"name", "runs": [...]}``, the
last ``KEEP`` runs of one model, newest last. A run is added only once it has finished,
by rewriting the whole file atomically (temp file in ``.blobctl/ingest``, fsync,
rename) under ``.blobctl/locks/bench.lock``: a benchmark killed at any instant leaves the
previous history intact, never half a row. Files that do not decode are ignored (and
replaced by the next run), and so is each run that does not decode to a sane row (a
name that does not parse or is not the file's, a time outside years 1970-9999, a
negative or non-finite figure): one bad row is skipped with a warning (a debug line
for the web page), never taken to every view that reads the history (found from
outside: one ``started_at`` of ``1e20`` made ``bench --history``, ``compare --json`` and
serve's whole page fail).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import filelock
import msgspec

from blobstore.decoding import decode
from blobstore.errors import BlobctlError, StoreBusy, StoreUnreadable
from blobstore.layout import file_mode, write_atomic
from blobstore.name import ModelName
from blobstore.owner import hand_over, make_dirs
from blobstore.store import Store

__all__ = ["KEEP", "LOCK_TIMEOUT", "BenchRun", "History", "LlamaPerf"]

KEEP = 10
LOCK_TIMEOUT = 30.0  # seconds to wait for bench.lock before StoreBusy

log = logging.getLogger("blobctl.bench")

# What a row read back must hold (checked on decoding; a run being built is not checked):
# times a calendar can show (``time.gmtime``, ``datetime``: up to 9999-12-31T23:59:59Z),
# figures finite and not negative, counts that fit 64 bits.
MAX_TIME = 253402300799.0
_Time = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_TIME)]
_Figure = Annotated[float, msgspec.Meta(ge=0.0, le=1e300)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
_Layers = Annotated[int, msgspec.Meta(ge=-1, le=(1 << 31) - 1)]


class LlamaPerf(msgspec.Struct):
    """llama.cpp's own timings of the same run (``llama_perf_context``)."""

    load_ms: _Figure
    prompt_eval_ms: _Figure
    prompt_tokens: _Count
    eval_ms: _Figure
    eval_tokens: _Count


class BenchRun(msgspec.Struct):
    name: str                 # host/ns/model:tag (a row whose name does not parse is skipped)
    model_digest: str         # the GGUF blob
    manifest_digest: str
    started_at: _Time         # unix time
    prompt_tokens: _Count
    generated_tokens: _Count
    load_seconds: _Figure
    prompt_seconds: _Figure
    generation_seconds: _Figure
    ttft_seconds: _Figure     # prompt evaluation + first token
    prompt_tps: _Figure
    generation_tps: _Figure
    peak_rss: _Count          # bytes, whole process (psutil), sampled during the run
    rss_before_load: _Count
    context_used: _Count
    context_size: _Count
    n_gpu_layers: _Layers
    n_threads: _Count
    llama_cpp_version: str
    llama: LlamaPerf

    @property
    def context_fraction(self) -> float:
        return self.context_used / self.context_size if self.context_size else 0.0


class _File(msgspec.Struct):
    name: str
    runs: list[BenchRun] = msgspec.field(default_factory=list)


class _RawFile(msgspec.Struct):
    """A history file as read: each run decoded on its own, so one bad row is one row."""

    name: str
    runs: list[msgspec.Raw] = msgspec.field(default_factory=list)


_DEC = msgspec.json.Decoder(_RawFile)
_RUN = msgspec.json.Decoder(BenchRun)
_ENC = msgspec.json.Encoder()


@dataclass
class History:
    """The store's benchmark history. ``quiet``: a skipped row is logged at DEBUG, not
    WARNING (the web page reads the history on every request)."""

    store: Store
    keep: int = KEEP
    quiet: bool = False
    lock_timeout: float | None = None  # None: LOCK_TIMEOUT
    _dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self._dir = self.store.layout.state_dir / "bench"

    def _path(self, name: ModelName) -> Path:
        return self._dir / (hashlib.sha256(name.key.encode()).hexdigest()[:32] + ".json")

    def _read(self, path: Path) -> _File | None:
        """The file's sane runs; None if it is not there, does not decode or its name
        does not parse (a damaged history is no history). A run that does not decode or
        whose name does not parse is left out, with a warning. Raises StoreUnreadable
        where it cannot be read (found from outside: `compare` of a store of another user
        said "no benchmark results yet")."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreUnreadable(str(path), exc.strerror or str(exc)) from exc
        try:
            raw = decode(data, _DEC)
            key = ModelName.parse(raw.name).key
        except (msgspec.DecodeError, msgspec.ValidationError, BlobctlError) as exc:
            self._skip("benchmark history %s ignored: %s", path, exc)
            return None
        runs = []
        for i, item in enumerate(raw.runs):
            try:
                run = decode(item, _RUN)
                if ModelName.parse(run.name).key != key:
                    self._skip("benchmark history %s: run %d skipped: it names %s, not %s",
                               path, i + 1, run.name, raw.name)
                    continue
            except (msgspec.DecodeError, msgspec.ValidationError, BlobctlError) as exc:
                self._skip("benchmark history %s: run %d skipped: %s", path, i + 1, exc)
                continue
            runs.append(run)
        return _File(raw.name, runs)

    def _skip(self, msg: str, *args: object) -> None:
        log.log(logging.DEBUG if self.quiet else logging.WARNING, msg, *args)

    def runs(self, name: ModelName) -> list[BenchRun]:
        """The model's runs, oldest first (at most ``keep``)."""
        f = self._read(self._path(name))
        return f.runs if f is not None else []

    def record(self, name: ModelName, run: BenchRun) -> None:
        """Append ``run`` and keep the last ``keep``; atomic (see the module docstring).
        Raises StoreBusy when ``bench.lock`` is not obtained within ``lock_timeout``."""
        make_dirs(self.store.layout.locks)
        path = self._path(name)
        timeout = LOCK_TIMEOUT if self.lock_timeout is None else self.lock_timeout
        lock = filelock.FileLock(str(self.store.layout.locks / "bench.lock"),
                                 timeout=timeout, mode=file_mode())
        try:
            lock.acquire()
        except filelock.Timeout as exc:  # (a TimeoutError: an OSError, exit 11 unmapped)
            raise StoreBusy("the benchmark history (.blobctl/locks/bench.lock)",
                            timeout) from exc
        try:
            hand_over(self.store.layout.locks / "bench.lock")
            old = self._read(path)
            runs = (old.runs if old is not None else []) + [run]
            data = _ENC.encode(_File(str(name), runs[-self.keep:]))
            write_atomic(path, data, self.store.layout.ingest)
        finally:
            lock.release()

    def all_latest(self) -> dict[str, BenchRun]:
        """The newest run of every model with a history (by full name)."""
        out: dict[str, BenchRun] = {}
        try:  # (not Path.glob: it takes a folder it cannot list for an empty one)
            paths = sorted(Path(e.path) for e in os.scandir(self._dir)
                           if e.name.endswith(".json"))
        except (FileNotFoundError, NotADirectoryError):
            return out
        except OSError as exc:
            raise StoreUnreadable(str(self._dir), exc.strerror or str(exc)) from exc
        for p in paths:
            f = self._read(p)
            if f is not None and f.runs:
                out[f.name] = f.runs[-1]
        return out
