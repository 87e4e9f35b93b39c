"""Import a local GGUF as a model, as ``ollama create`` builds one from a GGUF.

Result (spec/store-layout.md, "Imported models"):

* a model layer ``application/vnd.ollama.image.model`` (or ``…projector`` for a
  vision projector GGUF) holding the file's bytes;
* optional template, system, params and license layers;
* a config blob (``application/vnd.docker.container.image.v1+json``) with
  ``model_format: gguf``, ``model_family``/``model_families`` from the GGUF's
  ``general.architecture``, ``model_type`` (parameter count as Ollama prints it),
  ``file_type`` (quantisation), ``architecture``/``os`` and ``rootfs.diff_ids``;
* a Docker v2 manifest, Go-encoded with a trailing newline, written last.

The source file is copied (hashing while copying) unless ``mode`` is ``hardlink`` or
``move``. Nothing is written for a file that is not a usable GGUF.

A symlink (or a chain of them) is followed: the blob is a copy or hardlink of the
regular file it names, never a link. ``move`` of a symlink is refused (InvalidInput,
nothing written): it could only unlink the link (the file stays under its real name,
sharing the blob's inode) or the file (which the user still has under that name).

``move`` never risks the user's only copy: the file is hardlinked (or, across
filesystems, copied) into the store under a lease, and the source is unlinked only
after the manifest naming it is committed. Killed at any instant, the bytes are at the
source path (and maybe also in the store). A source that is the store's own file (a
blob, by any path: ``Layout.owns``) is never unlinked: the import is then a plain one
and ``ImportResult.mode`` says ``hardlink`` (the blob is that file) or ``copy``.

The GGUF check that decides "nothing is written for a file that is not a usable GGUF"
runs twice: on the source, to fail fast, and on the store's own bytes (the copy that
was hashed, or the link) before they get their digest name; the model is built from
the second reading. A file that changes between the two is refused (GGUFError, exit 4)
and no manifest is written, so a committed model's blob always passed the check.
(With ``hardlink``/``move`` the blob shares the source's inode: a write to the source
after that check corrupts the blob, which ``verify`` reports; spec/store-layout.md.)
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from blobstore.digest import Digest
from blobstore.errors import BlobNotFound, GGUFError, InvalidInput, NotFound, StoreDamaged
from blobstore.gguf import GGUFInfo, file_type_name, read_gguf
from blobstore.ingest import check_free_space
from blobstore.lease import Lease
from blobstore.manifest import (
    CONFIG_DOCKER,
    LAYER_LICENSE,
    LAYER_MODEL,
    LAYER_PARAMS,
    LAYER_PROJECTOR,
    LAYER_SYSTEM,
    LAYER_TEMPLATE,
    Descriptor,
    Manifest,
    build_manifest,
    go_json,
)
from blobstore.name import ModelName
from blobstore.store import Store, refuse_moving_symlink
from blobstore.units import human_number

__all__ = ["PARAMETERS", "ImportResult", "gguf_config", "gguf_manifest", "import_gguf",
           "model_from_blob", "parse_params", "utf8", "write_model"]

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class _RootFS(msgspec.Struct):
    type: str
    diff_ids: list[str]


class _ConfigV2(msgspec.Struct):
    """Ollama's ``model.ConfigV2`` field order."""

    model_format: str
    model_family: str
    model_families: list[str]
    model_type: str
    file_type: str
    architecture: str
    os: str
    rootfs: _RootFS


@dataclass
class ImportResult:
    name: ModelName
    manifest: Manifest
    model_digest: Digest
    model_size: int
    gguf: GGUFInfo
    mode: str


# The parameters ``ollama create`` accepts, with their types: the JSON names of Ollama's
# ``api.Options`` and its embedded ``api.Runner`` (ollama/ollama api/types.go;
# ``FormatParams`` refuses any other name, and a value that does not parse as its type).
# ``min_p`` is newer, the sampling ones Ollama dropped later (tfs_z, mirostat*,
# penalize_newline, the runner's numa/low_vram/f16_kv/logits_all/vocab_only/use_mlock)
# stay valid: models made for an older Ollama carry them.
PARAMETERS: dict[str, type] = {
    "num_keep": int, "seed": int, "num_predict": int, "top_k": int, "top_p": float,
    "min_p": float, "tfs_z": float, "typical_p": float, "repeat_last_n": int,
    "temperature": float, "repeat_penalty": float, "presence_penalty": float,
    "frequency_penalty": float, "mirostat": int, "mirostat_tau": float,
    "mirostat_eta": float, "penalize_newline": bool, "stop": list,
    "numa": bool, "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int,
    "low_vram": bool, "f16_kv": bool, "logits_all": bool, "vocab_only": bool,
    "use_mmap": bool, "use_mlock": bool, "num_thread": int,
}
_INT = re.compile(r"[+-]?[0-9]+")  # Go's strconv.ParseInt(s, 10, 64)
_BOOLS = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}


def _typed(key: str, value: str) -> object:
    kind = PARAMETERS[key]
    if kind is int:
        if _INT.fullmatch(value) and -(1 << 63) <= int(value) < 1 << 63:
            return int(value)
        raise InvalidInput(f"parameter {key!r} needs an integer, not {value!r}")
    if kind is bool:  # Go's strconv.ParseBool
        if value in ("1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false",
                     "False"):
            return _BOOLS[value.lower()]
        raise InvalidInput(f"parameter {key!r} needs true or false, not {value!r}")
    try:
        number = float(value) if "_" not in value else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):  # nan/inf: no JSON number holds them
        raise InvalidInput(f"parameter {key!r} needs a finite number, not {value!r}")
    # a whole number is written as Go writes a float32 that holds one: 1, not 1.0
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def parse_params(pairs: list[str]) -> dict[str, object]:
    """``["temperature=0.7", "stop=<|end|>", "stop=###"]`` -> typed params dict.

    As ``ollama create``: only Ollama's parameter names (:data:`PARAMETERS`), each value
    of its type (integer, finite number, boolean); ``stop`` always becomes a list (as in a
    Modelfile). Raises InvalidInput (the valid names in its hint) otherwise.
    """
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInput(f"invalid parameter {pair!r}", hint="use KEY=VALUE")
        utf8(pair, f"parameter {key!r}")
        if key not in PARAMETERS:
            raise InvalidInput(f"unknown parameter {key!r}",
                               hint=f"valid parameters: {', '.join(sorted(PARAMETERS))}")
        if key == "stop":
            stops = out.setdefault("stop", [])
            assert isinstance(stops, list)
            stops.append(value)
            continue
        out[key] = _typed(key, value.strip())
    return out


def utf8(text: str, what: str) -> bytes:
    """``text`` as UTF-8, or InvalidInput naming ``what``: a string from the command line
    or a file may hold bytes that are not UTF-8 (Python keeps them as lone surrogates),
    which no layer, manifest or prompt can carry."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{what} is not valid UTF-8",
                           hint="give the text in UTF-8") from exc


def _check_texts(template: str | None, system: str | None,
                 params: dict[str, object] | None, license_text: str | None) -> None:
    """InvalidInput before anything is written if a text layer would not be UTF-8."""
    for what, text in (("the template", template), ("the system prompt", system),
                       ("the license", license_text)):
        if text is not None:
            utf8(text, what)
    for key, value in (params or {}).items():
        utf8(key, "a parameter name")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                utf8(v, f"parameter {key}")


def _text_layer(store: Store, media_type: str, text: str, lease: Lease) -> Descriptor:
    data = utf8(text, media_type.rsplit(".", 1)[-1])
    return Descriptor(mediaType=media_type, digest=store.put_bytes(data, lease=lease),
                      size=len(data))


def import_gguf(
    store: Store,
    path: Path,
    name: ModelName,
    *,
    mode: str = "copy",
    template: str | None = None,
    system: str | None = None,
    params: dict[str, object] | None = None,
    license_text: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ImportResult:
    """Import ``path`` as model ``name``; return what was written.

    Raises GGUFError for a file that is not a GGUF (or is a LoRA adapter), and
    InvalidInput/StoreError subclasses for the rest. Idempotent: importing the same
    file under the same name twice writes the same manifest. ``progress(done, total)``
    reports the copy of the model file.
    """
    if mode not in ("copy", "hardlink", "move"):
        raise InvalidInput(f"unknown import mode {mode!r}")
    _check_texts(template, system, params, license_text)
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{path}: no such file", hint="check the path")
    if mode == "move":
        refuse_moving_symlink(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: not a regular file (a FIFO, device or socket)")
    if not os.access(path, os.R_OK):
        raise InvalidInput(f"{path}: not readable")
    info = read_gguf(path)
    if info.is_adapter:
        raise GGUFError(str(path), "it is a LoRA adapter, not a model")
    size = path.stat().st_size
    if mode == "copy":
        check_free_space(store.layout.blobs, size)

    with Lease(store.layout, f"import {name}") as lease:
        for attempt in range(3):
            try:
                return _build(store, path, name, info, mode, lease, template=template,
                              system=system, params=params, license_text=license_text,
                              progress=progress)
            except StoreDamaged:
                # A concurrent GC removed an identical, unreferenced blob just before our
                # lease named it; the manifest was not written. Put the blobs again.
                if attempt == 2 or not path.exists():
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


def _build(store: Store, path: Path, name: ModelName, info: GGUFInfo, mode: str,
           lease: Lease, *, template: str | None, system: str | None,
           params: dict[str, object] | None, license_text: str | None,
           progress: Callable[[int, int], None] | None) -> ImportResult:
    total = path.stat().st_size
    stored: list[GGUFInfo] = []

    def check(blob: Path) -> None:
        """The GGUF check, on the bytes the store keeps (not the source path)."""
        try:
            got = read_gguf(blob)
        except GGUFError as exc:
            if not blob.exists():  # the blob already there, removed by a GC meanwhile:
                raise StoreDamaged(name.display(), [str(blob)]) from exc  # tried again
            raise GGUFError(str(path), f"it changed while it was being imported and the "
                                       f"bytes taken are not a usable GGUF "
                                       f"({exc.reason})") from exc
        if got.is_adapter:
            raise GGUFError(str(path), "it is a LoRA adapter, not a model")
        stored.append(got)

    digest, size = store.put_file(
        path, mode=mode, lease=lease, unlink_source=False, check=check,
        progress=(lambda done: progress(done, total)) if progress is not None else None)
    if mode == "move" and store.layout.owns(path):
        mode = "hardlink"  # the store's own file: a plain import, nothing unlinked
    if mode == "hardlink":  # across file systems it was copied: say so (ImportResult.mode)
        # (BlobNotFound: an identical blob found present was removed by a GC that read
        # the leases before ours named it; the manifest commit below then fails with
        # StoreDamaged and import_gguf puts the blob again. Found from outside.)
        with contextlib.suppress(OSError, BlobNotFound):
            a, b = path.stat(), store.blob_path(digest).stat()
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                mode = "copy"
    info = stored[-1] if stored else info  # the store's bytes, not the source's
    return _assemble(store, name, info, digest, size, mode, lease, template=template,
                     system=system, params=params, license_text=license_text, source=path)


def model_from_blob(store: Store, digest: Digest, name: ModelName, *, lease: Lease,
                    template: str | None = None, system: str | None = None,
                    params: dict[str, object] | None = None,
                    license_text: str | None = None,
                    accept: Callable[[GGUFInfo], None] | None = None) -> ImportResult:
    """Make model ``name`` of a GGUF blob already in the store (a downloaded file).

    The same model ``import_gguf`` builds (config from the GGUF's metadata, Go-encoded
    manifest written last). ``lease`` must already name ``digest`` so that GC cannot
    remove the blob before the manifest refers to it. Raises GGUFError (the blob stays,
    unreferenced, for GC) for a blob that is not a GGUF model. ``accept`` is called with
    the blob's GGUF metadata before anything is written; what it raises refuses the blob
    the same way (``pull --file`` refuses a vision projector: spec/catalog.md).
    """
    _check_texts(template, system, params, license_text)
    path = store.blob_path(digest)
    info = read_gguf(path)
    if info.is_adapter:
        raise GGUFError(str(path), "it is a LoRA adapter, not a model")
    if accept is not None:
        accept(info)
    lease.add(digests={digest})
    return _assemble(store, name, info, digest, path.stat().st_size, "download", lease,
                     template=template, system=system, params=params,
                     license_text=license_text)


def _assemble(store: Store, name: ModelName, info: GGUFInfo, digest: Digest, size: int,
              mode: str, lease: Lease, *, template: str | None, system: str | None,
              params: dict[str, object] | None, license_text: str | None,
              source: Path | None = None) -> ImportResult:
    media_type = LAYER_PROJECTOR if info.is_projector else LAYER_MODEL
    layers = [Descriptor(mediaType=media_type, digest=digest, size=size)]
    if template is not None:
        layers.append(_text_layer(store, LAYER_TEMPLATE, template, lease))
    if system is not None:
        layers.append(_text_layer(store, LAYER_SYSTEM, system, lease))
    if params:
        data = go_json(dict(sorted(params.items())))
        layers.append(Descriptor(mediaType=LAYER_PARAMS,
                                 digest=store.put_bytes(data, lease=lease),
                                 size=len(data)))
    if license_text is not None:
        layers.append(_text_layer(store, LAYER_LICENSE, license_text, lease))

    manifest = write_model(store, name, info, layers, lease)
    # only now (the manifest keeps the blob), and never a store file: asked again here,
    # at the unlink, whatever was decided before
    if mode == "move" and source is not None and not store.layout.owns(source):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(source)
        with contextlib.suppress(OSError):
            os.chmod(store.layout.blob(digest), 0o444)
    return ImportResult(store.canonical_name(name), manifest, digest, size, info, mode)


def gguf_config(info: GGUFInfo, layers: list[Descriptor],
                parameter_count: int | None = None) -> bytes:
    """The config blob ``ollama create`` writes for a GGUF model (Go-encoded ConfigV2).

    ``parameter_count`` overrides the GGUF's own (a split model counts all its parts).
    """
    arch = info.architecture
    config = _ConfigV2(
        model_format="gguf",
        model_family=arch,
        model_families=[arch],
        model_type=human_number(info.parameter_count if parameter_count is None
                                else parameter_count),
        file_type=file_type_name(info.file_type),
        architecture=_GOARCH.get(platform.machine().lower(), platform.machine().lower()),
        os=platform.system().lower() or "linux",
        rootfs=_RootFS(type="layers", diff_ids=[str(d.digest) for d in layers]),
    )
    return go_json(config)


def gguf_manifest(info: GGUFInfo, layers: list[Descriptor],
                  parameter_count: int | None = None) -> tuple[bytes, Manifest]:
    """The config blob and the manifest :func:`write_model` writes for ``layers`` (pure:
    nothing is stored)."""
    config_bytes = gguf_config(info, layers, parameter_count)
    config_desc = Descriptor(mediaType=CONFIG_DOCKER, digest=Digest.of_bytes(config_bytes),
                             size=len(config_bytes))
    return config_bytes, build_manifest(config_desc, layers)


def write_model(store: Store, name: ModelName, info: GGUFInfo, layers: list[Descriptor],
                lease: Lease, parameter_count: int | None = None) -> Manifest:
    """Put the config blob for ``layers`` (all present) and write the manifest, last."""
    config_bytes, manifest = gguf_manifest(info, layers, parameter_count)
    store.put_bytes(config_bytes, lease=lease)
    store.put_manifest(name, manifest)
    return manifest
