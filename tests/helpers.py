"""Test fixtures written the way the real peers write them.

``write_ollama_store`` lays out a models folder exactly as Ollama does: blobs named
``sha256-<hex>`` (one under the legacy ``sha256:<hex>`` name), manifests under
``manifests/<host>/<ns>/<model>/<tag>`` holding the registry's compact bytes for
pulled models and Go-encoded JSON with a trailing newline for created ones, an
``hf.co`` model, a ``host:port`` model, two models sharing blobs, and a stale
``-partial`` download. Expected values (IDs, sizes) are computed here from the bytes,
independently of blobctl.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def make_gguf(path: Path, *, arch: str = "llama", file_type: int = 15, n_embd: int = 64,
              n_vocab: int = 300, layers: int = 1, kind: str | None = None,
              seed: int = 0) -> Path:
    """Write a tiny GGUF with the ``gguf`` package (the reference writer)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-{seed}")
    w.add_file_type(file_type)
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_block_count(layers)
    if kind is not None:
        w.add_type(kind)
    w.add_token_list([f"t{i}".encode() for i in range(n_vocab)])
    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, n_embd), dtype=np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_q.weight",
                     rng.standard_normal((n_embd, n_embd), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FixtureModel:
    display: str          # as `ollama list` shows it
    full: str             # host/ns/model:tag
    path: Path            # manifest file
    raw: bytes
    size: int             # config + layers, as ollama sums it
    model_digest: str     # sha256:<hex> of the GGUF layer

    @property
    def id(self) -> str:
        return sha256_hex(self.raw)[:12]


@dataclass
class OllamaFixture:
    root: Path
    models: dict[str, FixtureModel] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)   # "sha256:hex" -> content
    legacy_blob: str = ""
    partial_file: Path | None = None

    def blob_path(self, digest: str) -> Path:
        p = self.root / "blobs" / digest.replace(":", "-")
        return p if p.exists() else self.root / "blobs" / digest


def _put_blob(fx: OllamaFixture, data: bytes, *, legacy: bool = False) -> dict[str, object]:
    digest = "sha256:" + sha256_hex(data)
    name = digest if legacy else digest.replace(":", "-")
    (fx.root / "blobs" / name).write_bytes(data)
    fx.blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def _registry_manifest(config: dict[str, object], layers: list[dict[str, object]]) -> bytes:
    """Compact JSON as the registry serves it (key order differs from Go's)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
        "layers": layers,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _go_manifest(config: dict[str, object], layers: list[dict[str, object]]) -> bytes:
    """Go's json.Encoder: struct order, compact, trailing newline."""
    def desc(media: str, d: dict[str, object]) -> dict[str, object]:
        return {"mediaType": media, "digest": d["digest"], "size": d["size"]}
    doc = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": desc("application/vnd.docker.container.image.v1+json", config),
        "layers": [desc(str(x["mediaType"]), x) for x in layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def write_ollama_store(root: Path, tmp: Path) -> OllamaFixture:
    fx = OllamaFixture(root)
    (root / "blobs").mkdir(parents=True)
    (root / "manifests").mkdir()

    def add(parts: tuple[str, str, str, str], raw: bytes, display: str,
            config: dict[str, object], layers: list[dict[str, object]]) -> None:
        p = root / "manifests" / Path(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(raw)
        size = int(config["size"]) + sum(int(x["size"]) for x in layers)  # type: ignore[call-overload]
        model = next(x for x in layers if x["mediaType"] == "application/vnd.ollama.image.model")
        full = f"{parts[0]}/{parts[1]}/{parts[2]}:{parts[3]}"
        fx.models[display] = FixtureModel(display, full, p, raw, size, str(model["digest"]))

    g1 = make_gguf(tmp / "a.gguf", arch="llama", seed=1).read_bytes()
    g2 = make_gguf(tmp / "b.gguf", arch="qwen2", file_type=7, seed=2).read_bytes()
    g3 = make_gguf(tmp / "c.gguf", arch="gemma", file_type=1, seed=3).read_bytes()

    tmpl = _put_blob(fx, b"{{ .Prompt }}")
    params = _put_blob(fx, b'{"stop":["<|end|>"],"temperature":0.7}\n')
    cfg1 = _put_blob(fx, b'{"model_format":"gguf","model_family":"llama","model_families":'
                         b'["llama"],"model_type":"8.0B","file_type":"Q4_K_M",'
                         b'"architecture":"amd64","os":"linux"}')
    m1 = _put_blob(fx, g1)
    layers1 = [
        {"mediaType": "application/vnd.ollama.image.model", **m1},
        {"mediaType": "application/vnd.ollama.image.template", **tmpl},
        {"mediaType": "application/vnd.ollama.image.params", **params},
    ]
    raw1 = _registry_manifest(cfg1, layers1)
    add(("registry.ollama.ai", "library", "llama3", "8b"), raw1, "llama3:8b", cfg1, layers1)
    add(("registry.ollama.ai", "library", "llama3", "latest"), raw1, "llama3:latest",
        cfg1, layers1)

    # created locally by `ollama create FROM llama3:8b` with a system prompt: Go-encoded,
    # shares the model, template and params blobs with llama3
    system = _put_blob(fx, b"You are terse.")
    cfg2 = _put_blob(fx, b'{"model_format":"gguf","model_family":"llama"}\n')
    layers2 = [*layers1, {"mediaType": "application/vnd.ollama.image.system", **system}]
    raw2 = _go_manifest(cfg2, layers2)
    add(("registry.ollama.ai", "library", "terse", "latest"), raw2, "terse:latest",
        cfg2, layers2)

    # hf.co model, its model blob under the legacy "sha256:" file name
    cfg3 = _put_blob(fx, b'{"model_format":"gguf","model_family":"qwen2"}')
    m3 = _put_blob(fx, g2, legacy=True)
    fx.legacy_blob = str(m3["digest"])
    layers3 = [{"mediaType": "application/vnd.ollama.image.model", **m3}]
    raw3 = _registry_manifest(cfg3, layers3)
    add(("hf.co", "bartowski", "Qwen2.5-0.5B-Instruct-GGUF", "Q4_K_M"), raw3,
        "hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M", cfg3, layers3)

    # a private registry with a port, in a user namespace
    cfg4 = _put_blob(fx, b'{"model_format":"gguf","model_family":"gemma"}')
    m4 = _put_blob(fx, g3)
    layers4 = [{"mediaType": "application/vnd.ollama.image.model", **m4}]
    raw4 = _registry_manifest(cfg4, layers4)
    add(("localhost:5000", "team", "gem", "v1"), raw4, "localhost:5000/team/gem:v1",
        cfg4, layers4)

    # a stale partial download Ollama left behind
    partial = root / "blobs" / ("sha256-" + "ab" * 32 + "-partial")
    partial.write_bytes(b"\0" * 1000)
    fx.partial_file = partial
    # manifests that are older than "now", like a real store
    old = 1_700_000_000
    for i, m in enumerate(fx.models.values()):
        os.utime(m.path, (old + i, old + i))
    return fx
