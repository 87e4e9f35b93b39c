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
from typing import Any

import msgspec

from blobstore.digest import Digest
from blobstore.errors import InvalidDigest, InvalidManifest

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
    "build_manifest",
    "go_json",
    "scan_digests",
]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
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


class _ManifestDoc(msgspec.Struct):
    schemaVersion: int = 0
    mediaType: str = ""
    config: Descriptor | None = None
    layers: list[Descriptor] = msgspec.field(default_factory=list)
    manifests: list[Descriptor] | None = None


class _GoManifest(msgspec.Struct):
    """Field order of Ollama's Go ``Manifest`` struct, for manifests blobctl writes."""

    schemaVersion: int
    mediaType: str
    config: Descriptor
    layers: list[Descriptor]


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Digest and isinstance(obj, str):
        try:
            return Digest.parse(obj)
        except InvalidDigest as exc:
            raise ValueError(exc.message) from exc
    raise NotImplementedError(f"cannot decode {tp}")


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Digest):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj)}")


_DECODER = msgspec.json.Decoder(_ManifestDoc, dec_hook=_dec_hook)
_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)


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


_DIGEST_TEXT = re.compile(rb"\b(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}|blake3:[0-9a-f]{64})\b")


def scan_digests(raw: bytes) -> set[Digest]:
    """Every digest that appears anywhere in ``raw``.

    Used for manifests that do not decode (damaged, or a format this version does not
    know): GC and ``rm`` treat these digests as referenced rather than risk deleting
    blobs someone still needs.
    """
    return {Digest.parse(m.decode()) for m in _DIGEST_TEXT.findall(raw)}


def _check_descriptor(d: Descriptor, where: str, source: str | None) -> None:
    if d.size < 0 or d.size > MAX_BLOB_SIZE:
        raise InvalidManifest(f"{where} has an impossible size {d.size}", source=source)
    if not d.mediaType:
        raise InvalidManifest(f"{where} has no mediaType", source=source)


def _decode(raw: bytes, source: str | None) -> _ManifestDoc:
    if len(raw) > MAX_MANIFEST_SIZE:
        raise InvalidManifest(f"larger than {MAX_MANIFEST_SIZE} bytes", source=source)
    try:
        return _DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidManifest(str(exc), source=source) from exc


class Manifest:
    """A validated image manifest plus the exact bytes it came from."""

    __slots__ = ("config", "digest", "layers", "media_type", "raw")

    def __init__(
        self, raw: bytes, media_type: str, config: Descriptor, layers: list[Descriptor]
    ) -> None:
        self.raw = raw
        self.digest = Digest.of_bytes(raw)
        self.media_type = media_type
        self.config = config
        self.layers = layers

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
        _check_descriptor(doc.config, "config", source)
        for i, layer in enumerate(doc.layers):
            _check_descriptor(layer, f"layer {i}", source)
        return cls(raw, doc.mediaType or OCI_MANIFEST, doc.config, list(doc.layers))

    @property
    def descriptors(self) -> list[Descriptor]:
        """Config first, then layers: every blob this manifest needs."""
        return [self.config, *self.layers]

    @property
    def blob_digests(self) -> set[Digest]:
        return {d.digest for d in self.descriptors}

    @property
    def size(self) -> int:
        """Config plus layer sizes, as ``ollama list`` adds them up."""
        return sum(d.size for d in self.descriptors)

    def layers_of(self, media_type: str) -> list[Descriptor]:
        return [d for d in self.layers if d.mediaType == media_type]

    def model_layer(self) -> Descriptor | None:
        found = self.layers_of(LAYER_MODEL)
        return found[0] if found else None


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
        for i, d in enumerate(doc.manifests):
            _check_descriptor(d, f"manifest {i}", source)
        return cls(raw, doc.mediaType or OCI_INDEX, list(doc.manifests))

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
