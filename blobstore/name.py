"""Model names, parsed exactly as Ollama parses them (spec/names.md).

Grammar (Ollama ``types/model/name.go``)::

    [scheme://][host[:port]/][namespace/]model[:tag]

* The tag is split off only when the last ``:`` comes after the last ``/``; the rest is
  cut from the right at ``/`` into model, namespace and host.
* Defaults: host ``registry.ollama.ai``, namespace ``library``, tag ``latest``.
* Each part starts with a letter, digit or ``_``; then letters, digits, ``_`` and
  ``-``; ``.`` everywhere except the namespace; ``:`` only in the host (for a port).
* Lengths: host 1-255 (Ollama allows 350, but the host is a folder name and no file
  system takes more than 255 bytes: a longer one could never be stored), namespace/
  model/tag 1-80.
* blobctl's own aliases, only in the host position: ``hf``/``huggingface`` →
  ``hf.co`` and ``ollama`` → ``registry.ollama.ai``. Explicit hosts stay literal.

Case is kept as written (that is how it goes on disk) and names compare
case-insensitively, as Ollama compares them. No valid name can contain ``/`` inside a
part, start with ``.``, or be empty, so a name can never address a path outside
``manifests/``.
"""

from __future__ import annotations

import re

from blobstore.errors import InvalidName

__all__ = ["DEFAULT_HOST", "DEFAULT_NAMESPACE", "DEFAULT_TAG", "HOST_ALIASES", "ModelName"]

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

HOST_ALIASES: dict[str, str] = {
    "hf": "hf.co",
    "huggingface": "hf.co",
    "ollama": DEFAULT_HOST,
}

_SCHEMES = ("http", "https")
_ALNUM_US = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_PORT = re.compile(r"[0-9]+")
_MAX_LEN = {"host": 255, "namespace": 80, "model": 80, "tag": 80}


# Fast path: the whole part at once (the loop below explains a failure precisely).
_VALID = {
    "host": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,254}"),
    "namespace": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}"),
    "model": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"),
    "tag": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"),
}


# All four parts at once (fast path for listing thousands of manifests).
_FULL = re.compile("/".join(p.pattern for p in (_VALID["host"], _VALID["namespace"],
                                                   _VALID["model"])) + ":" + _VALID["tag"].pattern)


def _check_part(kind: str, value: str, whole: str) -> None:
    if _VALID[kind].fullmatch(value):
        return
    if not value:
        raise InvalidName(whole, f"empty {kind}")
    if len(value) > _MAX_LEN[kind]:
        raise InvalidName(whole, f"{kind} longer than {_MAX_LEN[kind]} characters")
    if value[0] not in _ALNUM_US:
        raise InvalidName(whole, f"{kind} {value!r} must start with a letter, digit or '_'")
    for ch in value[1:]:
        if ch in _ALNUM_US or ch in "-_":
            continue
        if ch == "." and kind != "namespace":
            continue
        if ch == ":" and kind == "host":
            continue
        raise InvalidName(whole, f"character {ch!r} is not allowed in the {kind}")
    raise InvalidName(whole, f"invalid {kind} {value!r}")  # pragma: no cover


def _cut_last(s: str, sep: str, whole: str, kind: str) -> tuple[str, str, bool]:
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    before, after = s[:i], s[i + 1 :]
    if not after:
        raise InvalidName(whole, f"empty {kind}")
    if not before:
        raise InvalidName(whole, f"nothing before {sep!r}")
    return before, after, True


class ModelName:
    """A fully qualified model name: host, namespace, model and tag.

    Immutable and hashable; equality and hashing ignore case, as Ollama does.
    ``scheme`` records an explicit ``http://``/``https://`` prefix (or ``""``); it is not
    part of the name's identity.
    """

    __slots__ = ("_key", "host", "model", "namespace", "scheme", "tag")

    host: str
    namespace: str
    model: str
    tag: str
    scheme: str
    _key: str

    def __init__(
        self, host: str, namespace: str, model: str, tag: str, scheme: str = ""
    ) -> None:
        whole = f"{host}/{namespace}/{model}:{tag}"
        if not _FULL.fullmatch(whole) or whole.count("/") != 2 or whole.count(":") != (
                host.count(":") + 1):
            for kind, value in (("host", host), ("namespace", namespace), ("model", model),
                                ("tag", tag)):
                _check_part(kind, value, whole)
        if scheme not in ("", *_SCHEMES):
            raise InvalidName(whole, f"unsupported scheme {scheme!r} (http or https)")
        for attr, value in (("host", host), ("namespace", namespace), ("model", model),
                            ("tag", tag), ("scheme", scheme)):
            object.__setattr__(self, attr, value)
        object.__setattr__(self, "_key", f"{host}/{namespace}/{model}:{tag}".lower())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ModelName is immutable")

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """Parse a user-given reference, filling in Ollama's defaults.

        Raises InvalidName with the reason; never returns a partial name.
        """
        if not isinstance(text, str):
            raise InvalidName(str(text), "not a string")
        whole = text
        s = text.strip()
        if s != text or not s:
            raise InvalidName(whole, "empty or surrounded by spaces")
        if len(s) > 600:
            raise InvalidName(whole[:80] + "…", "too long")

        try:
            return cls._parse(s, whole)
        except InvalidName as exc:  # name what the user wrote, not the defaults filled in
            if exc.name == whole:
                raise
            raise InvalidName(whole, exc.reason) from None

    @classmethod
    def _parse(cls, s: str, whole: str) -> ModelName:
        tag = ""
        if s.rfind(":") > s.rfind("/"):
            s, tag, _ = _cut_last(s, ":", whole, "tag")
        s, model, more = _cut_last(s, "/", whole, "model")
        if not more:
            return cls(DEFAULT_HOST, DEFAULT_NAMESPACE, s, tag or DEFAULT_TAG)
        s, namespace, more = _cut_last(s, "/", whole, "namespace")
        if not more:
            return cls(DEFAULT_HOST, s, model, tag or DEFAULT_TAG)
        scheme, sep, host = s.partition("://")
        if not sep:
            scheme, host = "", s
        if "/" in host:
            raise InvalidName(whole, "too many '/'-separated parts")
        host = HOST_ALIASES.get(host.lower(), host) if not scheme else host
        return cls(host, namespace, model, tag or DEFAULT_TAG, scheme)

    def registry_address(self) -> str:
        """The host as a URL's authority: ``host`` or ``host:port``, the port 1-65535 in
        decimal digits. Raises InvalidName for a host the grammar takes but no URL can
        hold (``h:``, ``h::``, ``h:1:2``, ``h:abc``, ``h:0``, ``h:70000``): Ollama's
        grammar allows ``:`` anywhere in a host and a model may be stored under such a
        name (it lists, shows and removes as any other), but it names no registry
        (spec/names.md, rule 9)."""
        _, sep, port = self.host.partition(":")
        if sep and not (_PORT.fullmatch(port) and 1 <= int(port) <= 65535):
            raise InvalidName(self.display(), f"host {self.host!r} is not a registry "
                                              "address (host or host:port, the port "
                                              "1-65535)")
        return self.host

    @classmethod
    def from_parts(cls, parts: tuple[str, str, str, str]) -> ModelName:
        """Build a name from the four path components under ``manifests/``."""
        return cls(*parts)

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)

    @property
    def key(self) -> str:
        """Case-folded full name: the identity used for comparisons and state."""
        return self._key

    @property
    def repository(self) -> str:
        """``namespace/model``: the repository path a registry serves this name under."""
        return f"{self.namespace}/{self.model}"

    def display(self) -> str:
        """The shortest form, as ``ollama list`` prints it (DisplayShortest)."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def with_tag(self, tag: str) -> ModelName:
        return ModelName(self.host, self.namespace, self.model, tag, self.scheme)

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def __repr__(self) -> str:
        return f"ModelName({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelName):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)
