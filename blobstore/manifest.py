"""Image manifests and indexes, decoded once into typed values (spec/store-layout.md).

A :class:`Manifest` always keeps the exact bytes it was decoded from: those bytes are
what goes on disk, and their sha256 is the model's identity (the ID ``ollama list``
shows). Both encodings found in real Ollama stores decode: the registry's compact JSON
and Go's ``json.Encoder`` output (compact, HTML-escaped, trailing newline). Unknown
fields are tolerated. Every descriptor is validated: digest on the OCI grammar with a
supported algorithm, ``0 <= size <= MAX_BLOB_SIZE``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

import msgspec

from blobstore.decoding import decode, decode_any
from blobstore.digest import Digest
from blobstore.errors import InvalidManifest

__all__ = [
    "CONFIG_DOCKER",
    "CONFIG_OCI",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_MEDIA_TYPES",
    "LAYER_ADAPTER",
    "LAYER_LICENSE",
    "LAYER_MESSAGES",
    "LAYER_MODEL",
    "LAYER_PARAMS",
    "LAYER_PROJECTOR",
    "LAYER_SYSTEM",
    "LAYER_TEMPLATE",
    "MANIFEST_MEDIA_TYPES",
    "MAX_BLOB_SIZE",
    "MAX_MANIFEST_SIZE",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Descriptor",
    "Index",
    "Manifest",
    "Platform",
    "OLLAMA_MANIFEST_LIST",
    "build_manifest",
    "decode_stored",
    "go_json",
    "referenced_by",
    "scan_digests",
]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# Newer Ollama's list of one manifest per runner (``manifest/manifest.go``), as a model's
# manifest file; the runners in the order Ollama prefers them off Apple silicon.
OLLAMA_MANIFEST_LIST = "application/vnd.ollama.manifest.list.v2+json"
OLLAMA_RUNNERS = ("ollama", "llamacpp", "mlx")
MANIFEST_MEDIA_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

CONFIG_DOCKER = "application/vnd.docker.container.image.v1+json"
CONFIG_OCI = "application/vnd.oci.image.config.v1+json"

LAYER_MODEL = "application/vnd.ollama.image.model"
LAYER_ADAPTER = "application/vnd.ollama.image.adapter"
LAYER_PROJECTOR = "application/vnd.ollama.image.projector"
LAYER_TEMPLATE = "application/vnd.ollama.image.template"
LAYER_SYSTEM = "application/vnd.ollama.image.system"
LAYER_PARAMS = "application/vnd.ollama.image.params"
LAYER_MESSAGES = "application/vnd.ollama.image.messages"
LAYER_LICENSE = "application/vnd.ollama.image.license"

# A blob larger than 16 TiB is not a model layer; a larger "size" is a broken or
# hostile manifest, refused before any byte is fetched.
MAX_BLOB_SIZE = 1 << 44
# Registries cap manifests at 4 MiB (distribution's default); so do we.
MAX_MANIFEST_SIZE = 4 << 20


class Platform(msgspec.Struct, omit_defaults=True):
    architecture: str = ""
    os: str = ""
    variant: str = ""


class Descriptor(msgspec.Struct, omit_defaults=True):
    """An OCI content descriptor (media type, digest, size, and optional extras)."""

    mediaType: str
    digest: Digest
    size: int
    urls: list[str] | None = None
    annotations: dict[str, str] | None = None
    platform: Platform | None = None


# On the wire, digests and sizes are validated by msgspec itself (C speed); typed
# Descriptors with Digest objects are built only when someone asks for them.
_DigestText = Annotated[str, msgspec.Meta(
    pattern=r"^(?:(?:sha256|blake3):[0-9a-f]{64}|sha512:[0-9a-f]{128})$")]
_Size = Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOB_SIZE)]
_MediaType = Annotated[str, msgspec.Meta(min_length=1)]


class _WireDescriptor(msgspec.Struct):
    mediaType: _MediaType
    digest: _DigestText
    size: _Size
    urls: list[str] | None = None
    annotations: dict[str, str] | None = None
    platform: Platform | None = None

    def typed(self) -> Descriptor:
        return Descriptor(self.mediaType, Digest.unchecked(self.digest), self.size,
                          self.urls, self.annotations, self.platform)


class _ManifestDoc(msgspec.Struct):
    schemaVersion: int = 0
    mediaType: str = ""
    config: _WireDescriptor | None = None
    layers: list[_WireDescriptor] = msgspec.field(default_factory=list)
    manifests: list[_WireDescriptor] | None = None


class _GoManifest(msgspec.Struct):
    """Field order of Ollama's Go ``Manifest`` struct, for manifests blobctl writes."""

    schemaVersion: int
    mediaType: str
    config: Descriptor
    layers: list[Descriptor]


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Digest):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj)}")


_DECODER = msgspec.json.Decoder(_ManifestDoc)
_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)

_DIGEST_TEXT = re.compile(rb"\b(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}|blake3:[0-9a-f]{64})\b")


def scan_digests(raw: bytes) -> set[Digest]:
    """Every digest that appears anywhere in ``raw``.

    Used for manifests that do not decode (damaged, or a format this version does not
    know): GC and ``rm`` treat these digests as referenced rather than risk deleting
    blobs someone still needs.
    """
    return {Digest.parse(m.decode()) for m in _DIGEST_TEXT.findall(raw)}


def referenced_by(raw: bytes) -> set[Digest]:
    """The blobs a manifest file's bytes reference: decoded, or, when they do not decode,
    every digest they mention (what GC and ``rm`` must keep)."""
    try:
        return Manifest.decode(raw).blob_digests
    except InvalidManifest:
        return scan_digests(raw)


def decode_stored(raw: bytes, *, source: str | None,
                  read_blob: Callable[[Digest], bytes | None]) -> Manifest:
    """A model's manifest file: an image manifest, or newer Ollama's manifest list, of
    which the manifest Ollama would run here (runners ``ollama``, ``llamacpp``, ``mlx`` in
    that order; one named by digest is read with ``read_blob`` and checked against it).
    Raises InvalidManifest."""
    try:
        return Manifest.decode(raw, source=source)
    except InvalidManifest as exc:
        if OLLAMA_MANIFEST_LIST.encode() not in raw:
            raise
        first = exc
    try:
        doc = decode_any(raw)
    except msgspec.DecodeError:
        raise first from None
    if not isinstance(doc, dict) or doc.get("mediaType") != OLLAMA_MANIFEST_LIST:
        raise first
    children = doc.get("manifests")
    if not isinstance(children, list):
        raise InvalidManifest("manifest list without 'manifests'", source=source)
    for runner in OLLAMA_RUNNERS:
        for child in children:
            if not (isinstance(child, dict) and child.get("mediaType", "") in (
                    "", DOCKER_MANIFEST) and str(child.get("runner", "")).lower() == runner):
                continue
            if child.get("config") is None and not child.get("layers"):  # by reference
                try:
                    d = Digest.parse(str(child.get("digest", "")))
                except ValueError as e:
                    raise InvalidManifest(f"manifest list names {child.get('digest')!r}",
                                          source=source) from e
                data = read_blob(d)
                if data is None:
                    raise InvalidManifest(f"its {runner} manifest {d} is missing",
                                          source=source)
                if Digest.of_bytes(data, d.algorithm) != d:
                    raise InvalidManifest(f"its {runner} manifest {d} is damaged",
                                          source=source)
            else:
                data = msgspec.json.encode(child)
            return Manifest.decode(data, source=source)
    raise InvalidManifest("manifest list without a manifest for the runners "
                          + ", ".join(OLLAMA_RUNNERS), source=source)


def go_json(value: Any) -> bytes:
    """Encode ``value`` as Go's ``json.NewEncoder(w).Encode`` would.

    Compact, struct fields in declaration order, ``<``, ``>``, ``&``, U+2028 and U+2029
    escaped, and a trailing newline. (Those characters only occur inside strings in
    JSON, so replacing them in the output is exact.)
    """
    out = _ENCODER.encode(value)
    for raw, esc in ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026"),
                     ("\u2028".encode(), b"\\u2028"), ("\u2029".encode(), b"\\u2029")):
        out = out.replace(raw, esc)
    return out + b"\n"


def _decode(raw: bytes, source: str | None) -> _ManifestDoc:
    if len(raw) > MAX_MANIFEST_SIZE:
        raise InvalidManifest(f"larger than {MAX_MANIFEST_SIZE} bytes", source=source)
    try:
        return decode(raw, _DECODER)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidManifest(str(exc), source=source) from exc


class Manifest:
    """A validated image manifest plus the exact bytes it came from."""

    __slots__ = ("_config", "_layers", "_size", "_wire", "digest", "media_type", "raw")

    def __init__(
        self, raw: bytes, media_type: str, config: Descriptor, layers: list[Descriptor]
    ) -> None:
        self.raw = raw
        self.digest = Digest.of_bytes(raw)
        self.media_type = media_type
        self._config: Descriptor | None = config
        self._layers: list[Descriptor] | None = layers
        self._wire: _ManifestDoc | None = None
        self._size = config.size + sum(d.size for d in layers)

    @classmethod
    def decode(cls, raw: bytes, *, source: str | None = None) -> Manifest:
        """Decode and validate manifest bytes; raise InvalidManifest with the reason."""
        doc = _decode(raw, source)
        if doc.manifests is not None and doc.config is None:
            raise InvalidManifest(
                "this is an image index, not an image manifest", source=source
            )
        if doc.schemaVersion != 2:
            raise InvalidManifest(
                f"schemaVersion {doc.schemaVersion} is not supported (need 2)", source=source
            )
        if doc.mediaType and doc.mediaType not in MANIFEST_MEDIA_TYPES:
            raise InvalidManifest(f"unsupported mediaType {doc.mediaType!r}", source=source)
        if doc.config is None:
            raise InvalidManifest("no config descriptor", source=source)
        sizes: dict[str, int] = {}
        for d in (doc.config, *doc.layers):
            if sizes.setdefault(d.digest, d.size) != d.size:
                # which size holds cannot be known, and the first one taken made the
                # outcome depend on the order (found from outside)
                raise InvalidManifest(f"blob {d.digest} is listed with sizes "
                                      f"{sizes[d.digest]} and {d.size}", source=source)
        m = cls.__new__(cls)
        m.raw = raw
        m.digest = Digest.of_bytes(raw)
        m.media_type = doc.mediaType or OCI_MANIFEST
        m._config = None
        m._layers = None
        m._wire = doc
        m._size = doc.config.size + sum(d.size for d in doc.layers)
        return m

    @property
    def config(self) -> Descriptor:
        if self._config is None:
            assert self._wire is not None and self._wire.config is not None
            self._config = self._wire.config.typed()
        return self._config

    @property
    def layers(self) -> list[Descriptor]:
        if self._layers is None:
            assert self._wire is not None
            self._layers = [d.typed() for d in self._wire.layers]
        return self._layers

    @property
    def descriptors(self) -> list[Descriptor]:
        """Config first, then layers: every blob this manifest needs."""
        return [self.config, *self.layers]

    @property
    def blob_digests(self) -> set[Digest]:
        if self._wire is not None and self._config is None:
            w = self._wire
            assert w.config is not None
            out = {Digest.unchecked(d.digest) for d in w.layers}
            out.add(Digest.unchecked(w.config.digest))
            return out
        return {d.digest for d in self.descriptors}

    @property
    def size(self) -> int:
        """Config plus layer sizes, as ``ollama list`` adds them up."""
        return self._size

    def layers_of(self, media_type: str) -> list[Descriptor]:
        return [d for d in self.layers if d.mediaType == media_type]

    def model_layer(self) -> Descriptor | None:
        found = self.layers_of(LAYER_MODEL)
        return found[0] if found else None

    def model_digest(self) -> Digest | None:
        """Digest of the GGUF layer, without building typed descriptors."""
        if self._wire is None:
            layer = self.model_layer()
            return layer.digest if layer else None
        for w in self._wire.layers:
            if w.mediaType == LAYER_MODEL:
                return Digest.unchecked(w.digest)
        return None


class Index:
    """A validated OCI image index / Docker manifest list."""

    __slots__ = ("digest", "manifests", "media_type", "raw")

    def __init__(self, raw: bytes, media_type: str, manifests: list[Descriptor]) -> None:
        self.raw = raw
        self.digest = Digest.of_bytes(raw)
        self.media_type = media_type
        self.manifests = manifests

    @classmethod
    def decode(cls, raw: bytes, *, source: str | None = None) -> Index:
        doc = _decode(raw, source)
        if doc.manifests is None:
            raise InvalidManifest("not an image index (no 'manifests')", source=source)
        if doc.schemaVersion != 2:
            raise InvalidManifest(
                f"schemaVersion {doc.schemaVersion} is not supported (need 2)", source=source
            )
        return cls(raw, doc.mediaType or OCI_INDEX, [d.typed() for d in doc.manifests])

    def select(self, os: str, architecture: str) -> Descriptor | None:
        """The first entry for ``os``/``architecture`` (entries without a platform match)."""
        for d in self.manifests:
            p = d.platform
            if p is None or (p.os in ("", os) and p.architecture in ("", architecture)):
                return d
        return None


def build_manifest(
    config: Descriptor, layers: list[Descriptor], media_type: str = DOCKER_MANIFEST
) -> Manifest:
    """A new manifest encoded as Ollama writes the ones it creates (Go JSON + newline)."""
    doc = _GoManifest(schemaVersion=2, mediaType=media_type, config=config, layers=layers)
    return Manifest(go_json(doc), media_type, config, layers)
