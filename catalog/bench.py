"""Load a model from the store with llama-cpp-python, benchmark it, generate from it.

Needs the optional extra ``llm`` (``pip install 'blobctl[llm]'``); without it every
entry point raises :class:`MissingExtra` naming what to install. ``llama_cpp`` is imported
only here and only when called.

* :func:`loaded` resolves the model in the store (recording a use), holds a **lease** on
  its blobs while the model is loaded (GC never evicts a model a process has mapped; the
  mapping itself is also seen by GC's in-use check), and hands the blob path to
  ``llama_cpp.Llama`` (mmap, no copy); a split GGUF's parts (N model layers) under the
  names llama.cpp finds them by (``catalog.splits``), after checking that the layers
  are the parts their ``split.*`` metadata describes.
* :func:`benchmark` measures load time, prompt tokens/s, generation tokens/s, time to
  first token, peak RSS (psutil, sampled every 5 ms) and context use. Prompt and
  generation are timed around ``llama_decode`` + ``llama_get_logits_ith`` (the span
  llama.cpp's own ``llama_perf_context`` counts), greedy sampling outside it, so the
  figures can be checked against llama.cpp's in the same run (``BenchRun.llama``).
  The run is recorded in the history (``catalog.history``) only when it finished; when
  the history's lock stays busy, :class:`~catalog.errors.RunNotSaved` (exit 9) carries it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blobstore.errors import GGUFError, InvalidInput, StoreBusy
from blobstore.gguf import GGUFInfo, read_gguf
from blobstore.importer import utf8
from blobstore.lease import Lease
from blobstore.manifest import LAYER_MODEL
from blobstore.name import ModelName
from blobstore.store import ResolvedModel, Store
from catalog.errors import MissingExtra, RunNotSaved
from catalog.history import BenchRun, History, LlamaPerf
from catalog.splits import SPLIT_PREFIX, split_links, split_name, split_problem

__all__ = ["DEFAULT_PROMPT", "Loaded", "benchmark", "generate", "llama_module", "loaded"]

log = logging.getLogger("blobctl.bench")

DEFAULT_PROMPT = ("Explain in a few sentences why content-addressed storage makes model "
                  "files easy to share between tools, and what a manifest is for.")


def llama_module(purpose: str = "this command") -> Any:
    """``llama_cpp``, or MissingExtra with what to install.

    Sets ``GGML_NO_BACKTRACE`` (unless set): when llama.cpp aborts the process on a
    failed ``GGML_ASSERT``, it then prints its one assertion line, not ~100 lines of a
    gdb backtrace of this process (ggml reads the variable when it aborts)."""
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingExtra("llama-cpp-python", "llm", purpose) from exc
    return llama_cpp


# Hyperparameters llama.cpp takes as they are and then asserts on in the middle of a
# decode (GGML_ASSERT aborts the process: exit 134, nothing to catch): a negative
# epsilon of a norm (found from outside: "GGML_ASSERT(eps >= 0.0f) failed", SIGABRT).
_EPSILON_KEYS = (".attention.layer_norm_rms_epsilon", ".attention.layer_norm_epsilon")


def _check_hyperparameters(info: GGUFInfo) -> str | None:
    """Why llama.cpp would abort on this model's metadata, or None."""
    for key, value in info.metadata.items():
        if not key.endswith(_EPSILON_KEYS):
            continue
        sane = (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value >= 0)
        if not sane:
            return (f"{key} is {value!r}: llama.cpp aborts the process on a norm "
                    "epsilon that is not a finite number >= 0")
    return None


# A line of llama.cpp's log that tells of a failure; the lines it adds while giving up
# (the generic ones, which name no cause). (The metadata dump, "llama_model_loader: - kv
# N: …", names keys such as ..._token_id and is never a failure.)
_FAILURE = re.compile(r"error|invalid|fail|insufficient|expected|unsupported|mismatch",
                      re.IGNORECASE)
_GENERIC = re.compile(r"failed to load model|failed to read tensor|failed to initiali[sz]e"
                      r"|failed to create|failed to allocate|alloc_tensor_range",
                      re.IGNORECASE)


class _LlamaLog:
    """llama.cpp's log, captured instead of printed while a model is loaded.

    With ``verbose=False`` llama-cpp-python swallows llama.cpp's messages during a load,
    and a failed load then says only "Failed to load model"; this callback keeps the
    last lines (bounded) so that the error can say why. On exit llama-cpp-python's
    own callback is put back.
    """

    def __init__(self, llama_cpp: Any) -> None:
        self._llama_cpp = llama_cpp
        self.lines: collections.deque[str] = collections.deque(maxlen=50)
        self._partial = ""

        @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
        def _callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
            # Levels are not compared: ggml renumbered them between versions.
            self._partial += text.decode("utf-8", "replace")
            while "\n" in self._partial:
                line, self._partial = self._partial.split("\n", 1)
                if line.strip():
                    self.lines.append(line.strip())

        self._callback = _callback  # referenced for as long as llama.cpp may call it

    def __enter__(self) -> _LlamaLog:
        self._llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            from llama_cpp import _logger
        except ImportError:  # pragma: no cover - another llama-cpp-python layout
            return  # keep ours (it only collects) rather than llama.cpp's print-everything
        self._llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))

    def reason(self, path: Path) -> str | None:
        """The most specific failure llama.cpp logged: the first line that says what
        failed (``tensor 'blk.0.attn_q.weight' has invalid ggml type 200``,
        ``insufficient memory (attempted to allocate 32768.00 MB)``), not the generic
        lines it then adds while giving up (``failed to load model from PATH``: found
        from outside, that was all the message said); the last generic one otherwise.
        The model's ``path`` is left out of the matching (a folder named ``errors``)."""
        hits, specific = [], []
        for line in self.lines:
            text = line.replace(str(path), "")
            if line.startswith("llama_model_loader: - ") or not _FAILURE.search(text):
                continue
            hits.append(line)
            # "error loading model: WHAT" is as specific as its WHAT
            if not _GENERIC.search(text.split("error loading model: ", 1)[-1]):
                specific.append(line)
        if specific:
            return specific[0]
        return hits[-1] if hits else None


@dataclass
class Loaded:
    llm: Any                     # llama_cpp.Llama
    resolved: ResolvedModel
    name: ModelName
    load_seconds: float
    rss_before_load: int


@contextlib.contextmanager
def loaded(store: Store, name: ModelName, *, n_ctx: int = 2048, n_gpu_layers: int = 0,
           n_threads: int | None = None, purpose: str = "blobctl bench",
           **llama_kwargs: Any) -> Iterator[Loaded]:
    """The model loaded with llama-cpp-python, a lease on its blobs held meanwhile.

    A split GGUF (N model layers) is loaded from symlinks named as llama.cpp wants them
    (``catalog.splits.split_links``), removed once the load is over, however it ends.

    Raises ModelNotFound/StoreDamaged (store), GGUFError (no usable GGUF, with
    llama.cpp's reason), InvalidInput (layers that are not the parts of one split GGUF
    in order, metadata llama.cpp would abort on), MissingExtra; OSError when the
    temporary folder for a split model's links cannot be made.
    """
    import psutil

    llama_cpp = llama_module(purpose)
    with Lease(store.layout, f"{purpose} {name}") as lease, \
            _LlamaLog(llama_cpp) as llama_log:
        resolved = store.resolve(name, lease=lease)  # blobs leased first; records a use
        if resolved.model_path is None:
            raise InvalidInput(f"model {name.display()} has no GGUF model layer")
        parts = resolved.model_paths
        layers = resolved.manifest.layers_of(LAYER_MODEL)

        suspect = 0  # the layer whose bytes are rehashed when what it says is refused
        try:
            infos: list[GGUFInfo] = []
            for part in parts:
                suspect = len(infos)
                infos.append(read_gguf(part))  # a readable GGUF, or GGUFError
            suspect = 0
            refused = _check_hyperparameters(infos[0])
            if refused is not None:
                raise InvalidInput(f"model {name.display()} cannot be loaded: {refused}",
                                   hint="the GGUF's metadata is wrong: fix or replace it")
            split = split_problem(infos)
            if split is not None:
                suspect, problem = split
                raise InvalidInput(f"model {name.display()} cannot be loaded: {problem}",
                                   hint="a split GGUF is one model only with all its "
                                        "parts, in order: pull it, or 'import --hf-cache' "
                                        "them, again")
        except InvalidInput:
            # damage (exit 5), not bad input, when the bytes are not the digest's
            store.check_blob_content(name, layers[suspect].digest)
            raise
        proc = psutil.Process()
        rss0 = int(proc.memory_info().rss)
        t0 = time.perf_counter()
        llm: Any = None
        failure: tuple[ValueError, str | None] | None = None
        # A split model's parts under the names llama.cpp finds them by, for as long as
        # the load reads them: the mappings it keeps are of the blobs themselves.
        with split_links(parts) as path:
            try:
                llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx,
                                      n_gpu_layers=n_gpu_layers, n_threads=n_threads,
                                      verbose=False, **llama_kwargs)
            except ValueError as exc:
                failure = exc, _reason(llama_log, path, parts)
        if failure is not None:
            error, why = failure
            if "llama_context" in str(error):
                # The model loaded; its context (the KV cache, which grows with n_ctx)
                # could not be made: a resource problem, not a bad file (found from
                # outside: --ctx 4194304 said "not a readable GGUF file", after a rehash)
                raise InvalidInput(
                    f"llama.cpp could not create a context of {n_ctx} tokens for "
                    f"{name.display()}: {why or error}",
                    hint="use a smaller --ctx: the context's memory grows with it") from error
            for layer in layers:  # (which part llama.cpp read wrong is not known)
                store.check_blob_content(name, layer.digest)
            raise GGUFError(str(parts[0]),
                            f"llama.cpp could not load it: {why or error}") from error
        load_s = time.perf_counter() - t0
        try:
            yield Loaded(llm, resolved, store.canonical_name(name), load_s, rss0)
        finally:
            llm.close()


def _reason(llama_log: _LlamaLog, path: Path, parts: list[Path]) -> str | None:
    """llama.cpp's reason for a failed load of ``parts`` from ``path``, naming the
    blobs, not the split links (gone once the load is over)."""
    if path == parts[0]:
        return llama_log.reason(path)
    why = llama_log.reason(path.parent)
    for i, part in enumerate(parts):
        link = path.with_name(split_name(SPLIT_PREFIX, i, len(parts)))
        why = why.replace(str(link), str(part)) if why is not None else None
    return why


class _RSSPeak:
    """Samples the process RSS every ``interval`` seconds in a thread; ``peak``."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = int(self._proc.memory_info().rss)
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="blobctl-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self) -> None:
        self.peak = max(self.peak, int(self._proc.memory_info().rss))

    def __enter__(self) -> _RSSPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _perf(llama_cpp: Any, ctx: Any) -> LlamaPerf:
    p = llama_cpp.llama_perf_context(ctx)
    return LlamaPerf(load_ms=float(p.t_load_ms), prompt_eval_ms=float(p.t_p_eval_ms),
                     prompt_tokens=int(p.n_p_eval), eval_ms=float(p.t_eval_ms),
                     eval_tokens=int(p.n_eval))


def benchmark(store: Store, name: ModelName, *, prompt: str = DEFAULT_PROMPT,
              n_predict: int = 128, n_ctx: int = 2048, n_gpu_layers: int = 0,
              n_threads: int | None = None, record: bool = True,
              on_loaded: Callable[[Loaded], None] | None = None) -> BenchRun:
    """Benchmark ``name`` (see the module docstring); record it in the history.

    Raises MissingExtra without llama-cpp-python (before anything else); InvalidInput
    when prompt + n_predict do not fit the context; RunNotSaved (a StoreBusy, with
    ``.run``) when the history's lock was not obtained in time.
    """
    llama_cpp = llama_module("blobctl bench")  # first: without the extra, numpy is
    import numpy as np  # missing too (a dependency of llama-cpp-python, not of blobctl)
    data = utf8(prompt, "the prompt")  # before the load: bad input fails fast
    if not data:  # (the tokens are never empty: the BOS token comes first)
        raise InvalidInput("the prompt is empty", hint="give a prompt, or leave --prompt out "
                                                       "for the built-in one")
    started = time.time()
    with _RSSPeak() as rss, loaded(store, name, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers,
                                   n_threads=n_threads) as m:
        if on_loaded is not None:
            on_loaded(m)
        llm = m.llm
        ctx = llm._ctx.ctx
        tokens = llm.tokenize(data, add_bos=True)
        size = min(n_ctx, int(llm.n_ctx()))  # what was asked: llama.cpp pads it up
        if len(tokens) + n_predict > size:
            raise InvalidInput(f"prompt ({len(tokens)} tokens) + --n-predict {n_predict} do "
                               f"not fit the context of {size} tokens",
                               hint="raise --ctx or lower --n-predict")
        n_vocab = int(llm.n_vocab())
        llama_cpp.llama_perf_context_reset(ctx)

        def step(toks: list[int]) -> tuple[float, int]:
            arr = (llama_cpp.llama_token * len(toks))(*toks)
            batch = llama_cpp.llama_batch_get_one(arr, len(toks))
            t = time.perf_counter()
            rc = llama_cpp.llama_decode(ctx, batch)
            logits = llama_cpp.llama_get_logits_ith(ctx, -1)
            dt = time.perf_counter() - t
            if rc != 0:
                raise InvalidInput(f"llama_decode failed with code {rc}")
            row = np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                        shape=(n_vocab,))
            return dt, int(row.argmax())

        # The prompt goes in batches of n_batch tokens (llama.cpp aborts on more); a
        # 1-token batch would count as generation in llama.cpp's figures, so none is made.
        n_batch = max(2, int(llm.n_batch))
        chunks = [tokens[i:i + n_batch] for i in range(0, len(tokens), n_batch)]
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks[-2:] = [chunks[-2][:-1], chunks[-2][-1:] + chunks[-1]]
        t_first = time.perf_counter()
        prompt_s = 0.0
        for chunk in chunks:
            dt, tok = step(chunk)
            prompt_s += dt
        ttft = time.perf_counter() - t_first
        gen_s = 0.0
        for _ in range(n_predict - 1):
            dt, tok = step([tok])
            gen_s += dt
        perf = _perf(llama_cpp, ctx)
        n_gen = max(0, n_predict - 1)  # decoded one at a time (the first came with the prompt)
        run = BenchRun(
            name=str(m.name), model_digest=str(m.resolved.manifest.model_digest()),
            manifest_digest=str(m.resolved.manifest.digest), started_at=started,
            prompt_tokens=len(tokens), generated_tokens=n_predict,
            load_seconds=m.load_seconds, prompt_seconds=prompt_s,
            generation_seconds=gen_s, ttft_seconds=ttft,
            prompt_tps=len(tokens) / prompt_s if prompt_s > 0 else 0.0,
            generation_tps=n_gen / gen_s if gen_s > 0 else 0.0,
            peak_rss=0, rss_before_load=m.rss_before_load,
            context_used=len(tokens) + n_predict, context_size=size,
            n_gpu_layers=n_gpu_layers, n_threads=int(llm.context_params.n_threads),
            llama_cpp_version=str(getattr(llama_cpp, "__version__", "?")), llama=perf)
    run.peak_rss = rss.peak
    if record:
        try:
            History(store).record(m.name, run)
        except StoreBusy as exc:
            raise RunNotSaved(run, exc) from exc
    return run


def generate(store: Store, name: ModelName, prompt: str, *, n_predict: int = 128,
             n_ctx: int = 2048, n_gpu_layers: int = 0, temperature: float = 0.8,
             seed: int | None = None,
             on_text: Callable[[str], None]) -> tuple[int, float]:
    """Stream a completion of ``prompt`` to ``on_text`` as tokens are sampled.

    Returns (tokens generated, seconds from the first token to the last): the speed is
    ``(n - 1) / seconds``. Stops at end-of-text or after ``n_predict`` tokens. Text is
    passed on in whole UTF-8 characters (a character split over byte tokens waits for
    its last byte).
    """
    data = utf8(prompt, "the prompt")  # before the load: bad input fails fast
    with loaded(store, name, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, purpose="blobctl run",
                seed=seed if seed is not None else 0xFFFFFFFF) as m:
        llm = m.llm
        tokens = llm.tokenize(data, add_bos=True)
        size = min(n_ctx, int(llm.n_ctx()))  # what was asked: llama.cpp pads it up
        if len(tokens) + n_predict > size:
            raise InvalidInput(f"prompt ({len(tokens)} tokens) + --n-predict {n_predict} do "
                               f"not fit the context of {size} tokens",
                               hint="raise --ctx or lower --n-predict")
        eos = llm.token_eos()
        n = 0
        first = last = 0.0
        pending = b""
        for tok in llm.generate(tokens, temp=temperature, reset=True):
            now = time.perf_counter()
            if tok == eos:
                break
            n += 1
            first = first or now
            last = now
            pending += llm.detokenize([tok])
            try:
                text = pending.decode("utf-8")
            except UnicodeDecodeError as exc:
                if len(pending) - exc.start < 4:  # an unfinished character: wait
                    text = pending[:exc.start].decode("utf-8")
                    pending = pending[exc.start:]
                else:
                    text, pending = pending.decode("utf-8", "replace"), b""
            else:
                pending = b""
            if text:
                on_text(text)
            if n >= n_predict:
                break
        if pending:
            on_text(pending.decode("utf-8", "replace"))
        return n, last - first


def model_path(store: Store, name: ModelName, lease: Lease | None = None) -> Path:
    """The GGUF path of ``name`` (for callers that load it themselves): pass the
    ``lease`` they hold while it is loaded, so that its blobs are leased before they
    are checked (``Store.resolve(lease=)``). InvalidInput for a split GGUF: no one path
    loads it (:func:`loaded` does; ``Store.resolve(...).model_paths`` are its parts)."""
    resolved = store.resolve(name, lease=lease)
    if resolved.model_path is None:
        raise InvalidInput(f"model {name.display()} has no GGUF model layer")
    if len(resolved.model_paths) > 1:
        raise InvalidInput(f"model {name.display()} is a split GGUF of "
                           f"{len(resolved.model_paths)} parts: no one path loads it",
                           hint="load it with catalog.bench.loaded(), or give llama.cpp "
                                "Store.resolve(...).model_paths under split names")
    return resolved.model_path
