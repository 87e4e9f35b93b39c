"""The model catalog: shipped data plus the user's own file (spec/catalog.md).

* Shipped: ``catalog/data/catalog.toml`` (package data); figures are approximate.
* User file: ``$BLOBCTL_CATALOG``, else ``~/.config/blobctl/catalog.toml`` (or
  ``$XDG_CONFIG_HOME/blobctl/catalog.toml``); TOML, or JSON when the name ends in
  ``.json``. Same shape (``[[model]]`` entries); an entry with an existing id replaces
  the shipped one, new ids are added.
* A catalog id can stand where a model name is expected (``blobctl pull
  qwen2.5-coder-7b-q5``): :func:`resolve_ref` turns it into its source name.

Loading never touches the network. Raises :class:`CatalogError` for a file that does
not parse or an entry that does not validate (the error names the file and entry).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from blobstore.decoding import loads, parse_text
from blobstore.errors import InvalidInput
from blobstore.name import ModelName
from blobstore.units import parse_size
from catalog.errors import CatalogError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["TIERS", "Catalog", "CatalogEntry", "load_catalog", "resolve_ref", "user_catalog_path"]

TIERS = ("lite", "standard", "professional")
_REQUIRED = ("id", "name", "source", "file_size", "ram_required")


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    name: str
    family: str
    parameters: str
    quantization: str
    context: int
    file_size: int
    ram_required: int
    tier: str
    tags: tuple[str, ...]
    recommended: bool
    description: str
    source: ModelName
    approximate: bool = True
    origin: str = "shipped"  # "shipped" or the user file's path

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "family": self.family,
                "parameters": self.parameters, "quantization": self.quantization,
                "context": self.context, "file_size": self.file_size,
                "ram_required": self.ram_required, "tier": self.tier,
                "tags": list(self.tags), "recommended": self.recommended,
                "description": self.description, "source": str(self.source),
                "approximate": self.approximate, "origin": self.origin}


@dataclass
class Catalog:
    entries: list[CatalogEntry] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def get(self, ident: str) -> CatalogEntry | None:
        low = ident.lower()
        for e in self.entries:
            if e.id.lower() == low:
                return e
        return None

    def select(self, *, tier: str | None = None, tag: str | None = None) -> list[CatalogEntry]:
        out = self.entries
        if tier is not None:
            out = [e for e in out if e.tier == tier]
        if tag is not None:
            out = [e for e in out if tag.lower() in (t.lower() for t in e.tags)]
        return list(out)


def user_catalog_path() -> Path | None:
    """The user's catalog file: ``$BLOBCTL_CATALOG`` or the XDG config one (if present)."""
    env = os.environ.get("BLOBCTL_CATALOG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    for name in ("catalog.toml", "catalog.json"):
        p = Path(base) / "blobctl" / name
        if p.is_file():
            return p
    return None


def _size(value: object, what: str, source: str) -> int:
    if isinstance(value, bool):
        raise CatalogError(source, f"{what}: expected a size, got {value!r}")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return parse_size(value)
        except InvalidInput as exc:
            raise CatalogError(source, f"{what}: {exc.message}") from exc
    raise CatalogError(source, f"{what}: expected a size (bytes or e.g. \"4.7GB\"), "
                               f"got {value!r}")


def _entry(doc: Any, source: str, origin: str, default_approx: bool) -> CatalogEntry:
    if not isinstance(doc, dict):
        raise CatalogError(source, f"a model entry must be a table, got {doc!r}")
    ident = doc.get("id")
    where = f"entry {ident!r}" if ident else "an entry"
    for key in _REQUIRED:
        if key not in doc:
            raise CatalogError(source, f"{where} has no {key!r}")
    for key in ("id", "name", "source"):
        if not isinstance(doc[key], str) or not doc[key]:
            raise CatalogError(source, f"{where}: {key!r} must be a non-empty string")
    try:
        src = ModelName.parse(doc["source"])
    except InvalidInput as exc:
        raise CatalogError(source, f"{where}: source: {exc.message}") from exc
    tier = doc.get("tier", "standard")
    if tier not in TIERS:
        raise CatalogError(source, f"{where}: tier must be one of {', '.join(TIERS)}, "
                                   f"got {tier!r}")
    tags = doc.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise CatalogError(source, f"{where}: tags must be a list of strings")
    context = doc.get("context", 0)
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise CatalogError(source, f"{where}: context must be a whole number of tokens")
    return CatalogEntry(
        id=doc["id"], name=doc["name"], family=str(doc.get("family", "")),
        parameters=str(doc.get("parameters", "")),
        quantization=str(doc.get("quantization", src.tag)),
        context=context,
        file_size=_size(doc["file_size"], f"{where}: file_size", source),
        ram_required=_size(doc["ram_required"], f"{where}: ram_required", source),
        tier=tier, tags=tuple(tags),
        recommended=_flag(doc.get("recommended", False), f"{where}: recommended", source),
        description=str(doc.get("description", "")), source=src,
        approximate=_flag(doc.get("approximate", default_approx), f"{where}: approximate",
                          source), origin=origin)


def _flag(value: object, what: str, source: str) -> bool:
    """A true/false setting (found from outside: ``recommended = "false"`` read as true,
    since ``bool`` of any non-empty string is)."""
    if not isinstance(value, bool):
        raise CatalogError(source, f"{what} must be true or false, not {value!r}")
    return value


def _parse(text: str, source: str, *, as_json: bool) -> dict[str, Any]:
    try:
        doc = loads(text) if as_json else parse_text(tomllib.loads, text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(source, f"does not parse: {exc}") from exc
    if isinstance(doc, list):  # JSON: a bare list of entries is fine too
        doc = {"model": doc}
    if not isinstance(doc, dict):
        raise CatalogError(source, "expected a table with [[model]] entries")
    models = doc.get("model", [])
    if not isinstance(models, list):
        raise CatalogError(source, "'model' must be a list of entries ([[model]] in TOML)")
    unknown = sorted(set(doc) - {"model", "meta"})
    if unknown:  # (found from outside: a [[models]] table was ignored without a word)
        raise CatalogError(source, f"unknown table {unknown[0]!r} (entries are [[model]], "
                                   "settings [meta])")
    return doc


def _entries(doc: dict[str, Any], source: str, origin: str) -> list[CatalogEntry]:
    meta = doc.get("meta", {})
    approx = (_flag(meta.get("approximate", False), "meta: approximate", source)
              if isinstance(meta, dict) else False)
    out: list[CatalogEntry] = []
    seen: set[str] = set()
    for raw in doc.get("model", []):
        e = _entry(raw, source, origin, approx)
        if e.id.lower() in seen:
            raise CatalogError(source, f"id {e.id!r} appears twice")
        seen.add(e.id.lower())
        out.append(e)
    return out


def load_catalog(user_file: Path | bool | None = True) -> Catalog:
    """The shipped catalog merged with the user's file.

    ``user_file``: ``True`` finds it (:func:`user_catalog_path`), ``False``/``None``
    skips it, a path uses that file. A named file that does not exist is an error.
    """
    text = resources.files("catalog").joinpath("data/catalog.toml").read_text("utf-8")
    cat = Catalog(_entries(_parse(text, "(shipped)", as_json=False), "(shipped)", "shipped"),
                  ["(shipped)"])
    path = user_catalog_path() if user_file is True else (user_file or None)
    if isinstance(path, Path):
        try:
            utext = path.read_text("utf-8")
        except OSError as exc:
            raise CatalogError(str(path), exc.strerror or str(exc)) from exc
        except UnicodeDecodeError as exc:  # spec/cli.md: text that is not UTF-8 is exit 4
            raise CatalogError(str(path), f"not UTF-8 text (byte {exc.start})") from exc
        extra = _entries(_parse(utext, str(path), as_json=path.suffix.lower() == ".json"),
                         str(path), str(path))
        by_id = {e.id.lower(): i for i, e in enumerate(cat.entries)}
        for e in extra:
            i = by_id.get(e.id.lower())
            if i is None:
                cat.entries.append(e)
            else:
                cat.entries[i] = e
        cat.sources.append(str(path))
    return cat


def resolve_ref(text: str, catalog: Catalog | None = None) -> tuple[ModelName, CatalogEntry | None]:
    """A model reference: a catalog id (no ``/`` or ``:``) becomes its source name.

    Anything else parses as a model name (raises ``InvalidName``). A bare word that is not
    a catalog id is a plain Ollama-library name, as before.
    """
    if "/" not in text and ":" not in text:
        cat = catalog if catalog is not None else load_catalog()
        entry = cat.get(text)
        if entry is not None:
            return entry.source, entry
    return ModelName.parse(text), None
