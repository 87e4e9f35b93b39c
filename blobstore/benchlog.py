"""Benchmark history in the store's state folder (spec/catalog.md, "bench"); written by
``catalog.bench``, read by ``blobctl bench --history`` and the server's web page.

``.blobctl/bench/<sha256 of the model's key>.json`` holds ``{"name", "runs": [...]}``, the
last ``KEEP`` runs of one model, newest last. A run is added only once it has finished,
by rewriting the whole file atomically (temp file in ``.blobctl/ingest``, fsync,
rename) under ``.blobctl/locks/bench.lock``: a benchmark killed at any instant leaves the
previous history intact, never half a row. Files that do not decode are ignored (and
replaced by the next run).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import msgspec

from blobstore.decoding import decode
from blobstore.errors import StoreUnreadable
from blobstore.layout import file_mode, write_atomic
from blobstore.name import ModelName
from blobstore.owner import hand_over, make_dirs
from blobstore.store import Store

__all__ = ["KEEP", "BenchRun", "History", "LlamaPerf"]

KEEP = 10


class LlamaPerf(msgspec.Struct):
    """llama.cpp's own timings of the same run (``llama_perf_context``)."""

    load_ms: float
    prompt_eval_ms: float
    prompt_tokens: int
    eval_ms: float
    eval_tokens: int


class BenchRun(msgspec.Struct):
    name: str                 # host/ns/model:tag
    model_digest: str         # the GGUF blob
    manifest_digest: str
    started_at: float         # unix time
    prompt_tokens: int
    generated_tokens: int
    load_seconds: float
    prompt_seconds: float
    generation_seconds: float
    ttft_seconds: float       # prompt evaluation + first token
    prompt_tps: float
    generation_tps: float
    peak_rss: int             # bytes, whole process (psutil), sampled during the run
    rss_before_load: int
    context_used: int
    context_size: int
    n_gpu_layers: int
    n_threads: int
    llama_cpp_version: str
    llama: LlamaPerf

    @property
    def context_fraction(self) -> float:
        return self.context_used / self.context_size if self.context_size else 0.0


class _File(msgspec.Struct):
    name: str
    runs: list[BenchRun] = msgspec.field(default_factory=list)


_DEC = msgspec.json.Decoder(_File)
_ENC = msgspec.json.Encoder()


@dataclass
class History:
    store: Store
    keep: int = KEEP
    _dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self._dir = self.store.layout.state_dir / "bench"

    def _path(self, name: ModelName) -> Path:
        return self._dir / (hashlib.sha256(name.key.encode()).hexdigest()[:32] + ".json")

    def _read(self, path: Path) -> _File | None:
        """The file's runs; None if it is not there or does not decode (a damaged history
        is no history). Raises StoreUnreadable where it cannot be read (found from
        outside: `compare` of a store of another user said "no benchmark results yet")."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreUnreadable(str(path), exc.strerror or str(exc)) from exc
        try:
            return decode(data, _DEC)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    def runs(self, name: ModelName) -> list[BenchRun]:
        """The model's runs, oldest first (at most ``keep``)."""
        f = self._read(self._path(name))
        return f.runs if f is not None else []

    def record(self, name: ModelName, run: BenchRun) -> None:
        """Append ``run`` and keep the last ``keep``; atomic (see the module docstring)."""
        make_dirs(self.store.layout.locks)
        path = self._path(name)
        with filelock.FileLock(str(self.store.layout.locks / "bench.lock"), timeout=30,
                               mode=file_mode()):
            hand_over(self.store.layout.locks / "bench.lock")
            old = self._read(path)
            runs = (old.runs if old is not None else []) + [run]
            data = _ENC.encode(_File(str(name), runs[-self.keep:]))
            write_atomic(path, data, self.store.layout.ingest)

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
