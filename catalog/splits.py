"""A split GGUF (one model in N files, N model layers) handed to llama.cpp.

llama.cpp loads a split model from the path of its first part and finds the others by
name (llama.cpp ``src/llama.cpp`` ``llama_split_prefix`` / ``llama_split_path``, called
by ``llama_get_list_splits`` in ``src/llama-model-loader.cpp``): the first path must end
in ``-00001-of-0000N.gguf`` (else "invalid split file name"), part ``i`` (0-based) is
``PREFIX-%05d-of-%05d.gguf`` with ``i + 1`` and ``N``, beside it. The loader then reads
``split.count`` (N) from the first part, requires ``split.no`` 0 there and ``split.no``
``i`` in part ``i``, and ``split.tensors.count`` tensors in all. A store's blobs are
named by digest, so :func:`split_links` gives llama.cpp the parts under those names:
symlinks in a private temporary folder, removed when the block ends. Symlinks, not
hardlinks: the mappings llama.cpp makes are of the blobs themselves (GC's in-use check
sees them), and a symlink crosses filesystems.

:func:`split_problem` says, before a load, why the model's layers are not the split
their GGUFs describe (llama.cpp would fail with a message that blames a file).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from blobstore.gguf import GGUFInfo

__all__ = ["SPLIT_COUNT", "SPLIT_NO", "SPLIT_PREFIX", "SPLIT_TENSORS", "split_links",
           "split_name", "split_problem"]

# The keys of llama.cpp's LLM_KV_SPLIT_* (src/llama-arch.cpp), as the gguf package's
# Keys.Split writes them
SPLIT_NO = "split.no"
SPLIT_COUNT = "split.count"
SPLIT_TENSORS = "split.tensors.count"
SPLIT_PREFIX = "model"  # the links' names: model-00001-of-0000N.gguf …


def split_name(prefix: str, no: int, count: int) -> str:
    """The name llama.cpp gives part ``no`` (0-based) of ``count`` (``llama_split_path``:
    ``"%s-%05d-of-%05d.gguf"``)."""
    return f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


def _int(info: GGUFInfo, key: str) -> int | None:
    v = info.metadata.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def split_problem(infos: Sequence[GGUFInfo]) -> tuple[int, str] | None:
    """Why GGUFs ``infos`` (a model's model layers, in layer order) are not one model
    llama.cpp loads as they are, with the index of the layer that says so; or None. One
    layer: fine unless it says it is a part of a split (``split.count`` > 1). N layers:
    the first says ``split.count`` N and ``split.tensors.count`` as many tensors as the
    layers hold; layer ``i`` says ``split.no`` ``i`` (what llama.cpp's loader checks)."""
    n = len(infos)
    count = _int(infos[0], SPLIT_COUNT) if infos else None
    if n == 1:
        if count is not None and count > 1:
            return 0, (f"its GGUF is part {(_int(infos[0], SPLIT_NO) or 0) + 1} of a split "
                    f"GGUF of {count} files ({SPLIT_COUNT} {count}), but the model has no "
                    "other model layer")
        return None
    if count != n:
        said = f"says {SPLIT_COUNT} {count}" if count is not None else f"has no {SPLIT_COUNT}"
        return 0, (f"it has {n} model layers, but the first layer's GGUF {said}: the layers "
                "are not the parts of one split GGUF")
    for i, info in enumerate(infos):
        no = _int(info, SPLIT_NO)
        if no != i:
            said = f"{SPLIT_NO} {no} (part {no + 1})" if no is not None else f"no {SPLIT_NO}"
            return i, (f"model layer {i + 1} of {n} has {said} in its GGUF, not part {i + 1}: "
                    "the layers are not the parts of one split GGUF in order")
    expected = _int(infos[0], SPLIT_TENSORS)
    found = sum(info.tensor_count for info in infos)
    if expected != found:
        said = f"says {SPLIT_TENSORS} {expected}" if expected is not None \
            else f"has no {SPLIT_TENSORS}"
        return 0, (f"its first layer's GGUF {said}, but its {n} layers hold {found} tensors")
    return None


_FOLDER = "blobctl-split-"


@contextlib.contextmanager
def split_links(parts: Sequence[Path], *, prefix: str = SPLIT_PREFIX) -> Iterator[Path]:
    """The path to load ``parts`` (in order) from: for one part, that part; for more,
    the first of ``PREFIX-0000i-of-0000N.gguf`` symlinks to them (absolute) in a new
    private (0700) folder ``blobctl-split-PID-…`` of the temporary directory, removed
    with its links when the block ends, however it ends (an error, or a signal the CLI
    turns into an exception: the folder is named before it is made, so that one cannot
    land between its making and the cleanup that owns it). The folders of
    processes that are gone (killed with SIGKILL, or by the OOM killer mid-load) are
    removed first. Raises OSError when the folder or a link cannot be made (nothing is
    left behind then)."""
    if len(parts) == 1:
        yield parts[0]
        return
    tmp = Path(tempfile.gettempdir())
    _sweep(tmp)
    # named before it is made, by a random name no one else makes: a signal landing at
    # any point from here on finds the cleanup ahead of it (found by review: blocking
    # the signals in this thread held nothing back, a helper thread took them)
    name = tmp / f"{_FOLDER}{os.getpid()}-{secrets.token_hex(8)}"
    folder: Path | None = name
    try:
        try:
            os.mkdir(name, 0o700)
        except FileExistsError:
            folder = None  # (not ours)
            raise
        links = [name / split_name(prefix, i, len(parts)) for i in range(len(parts))]
        for link, part in zip(links, parts, strict=True):
            os.symlink(Path(part).absolute(), link)
        yield links[0]
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _sweep(tmp: Path) -> None:
    """Remove the link folders (ours: same user) of processes that no longer run."""
    try:
        entries = [e for e in os.scandir(tmp) if e.name.startswith(_FOLDER)]
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(_FOLDER):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _running(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False) and \
                    entry.stat(follow_symlinks=False).st_uid == os.getuid():
                shutil.rmtree(entry.path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (EPERM: it runs, as another user)
        return True
    return True
