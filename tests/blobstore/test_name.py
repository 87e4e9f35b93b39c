from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobstore.errors import InvalidName
from blobstore.layout import Layout
from blobstore.name import ModelName


@pytest.mark.parametrize(("ref", "parts"), [
    ("llama3", ("registry.ollama.ai", "library", "llama3", "latest")),
    ("llama3:8b", ("registry.ollama.ai", "library", "llama3", "8b")),
    ("user/model", ("registry.ollama.ai", "user", "model", "latest")),
    ("user/model:v1.2", ("registry.ollama.ai", "user", "model", "v1.2")),
    ("example.com/ns/model:tag", ("example.com", "ns", "model", "tag")),
    ("localhost:5000/ns/model", ("localhost:5000", "ns", "model", "latest")),
    ("localhost:5000/ns/model:t", ("localhost:5000", "ns", "model", "t")),
    ("hf.co/bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M",
     ("hf.co", "bartowski", "Qwen2.5-0.5B-Instruct-GGUF", "Q4_K_M")),
    ("https://example.com/ns/m:t", ("example.com", "ns", "m", "t")),
    ("http://127.0.0.1:8080/ns/m", ("127.0.0.1:8080", "ns", "m", "latest")),
    ("hf/user/repo:Q8_0", ("hf.co", "user", "repo", "Q8_0")),
    ("huggingface/user/repo", ("hf.co", "user", "repo", "latest")),
    ("ollama/library/llama3", ("registry.ollama.ai", "library", "llama3", "latest")),
    ("HF/user/repo", ("hf.co", "user", "repo", "latest")),
    ("huggingface.co/user/repo", ("huggingface.co", "user", "repo", "latest")),
    ("_x/_y", ("registry.ollama.ai", "_x", "_y", "latest")),
    ("Mistral:Latest", ("registry.ollama.ai", "library", "Mistral", "Latest")),
])
def test_parse(ref: str, parts: tuple[str, str, str, str]) -> None:
    assert ModelName.parse(ref).parts == parts


@pytest.mark.parametrize("ref", [
    "", " ", "llama3:", ":tag", "/model", "ns/", "a/b/c/d", "a/b/c/d:e", "-model",
    ".model", "ns.x/model", "model:ta/g", "model:-tag", "..", "../x", "a/../b",
    "host/../model", "model:t:ag", "mo:del/x", "x" * 81, "ns/" + "m" * 81,
    "model:" + "t" * 81, "h" * 351 + "/ns/m", "model@sha256:abc", "mo del", "mo\\del",
    "ftp://host/ns/m", "model\n", "ns/mo:del:x",
])
def test_rejects_bad_names(ref: str) -> None:
    with pytest.raises(InvalidName) as exc:
        ModelName.parse(ref)
    assert "\n" not in exc.value.message


def test_case_insensitive_identity_keeps_case() -> None:
    a, b = ModelName.parse("Mistral:Latest"), ModelName.parse("mistral:latest")
    assert a == b and hash(a) == hash(b)
    assert a.model == "Mistral" and str(a) == "registry.ollama.ai/library/Mistral:Latest"


@pytest.mark.parametrize(("ref", "shown"), [
    ("llama3", "llama3:latest"),
    ("user/model:1", "user/model:1"),
    ("hf.co/u/r:Q4", "hf.co/u/r:Q4"),
    ("example.com/library/m", "example.com/library/m:latest"),
    ("REGISTRY.OLLAMA.AI/LIBRARY/m:x", "m:x"),
])
def test_display_shortest(ref: str, shown: str) -> None:
    assert ModelName.parse(ref).display() == shown


def test_max_lengths_accepted() -> None:
    n = ModelName.parse("h" * 255 + "/" + "n" * 80 + "/" + "m" * 80 + ":" + "t" * 80)
    assert len(n.host) == 255


def test_a_host_the_file_system_cannot_hold_is_an_invalid_name(tmp_path: Path) -> None:
    """A host is a folder name: 256+ characters could never be stored (found from
    outside: import wrote blobs, then failed with 'File name too long'); the longest
    valid name is stored and found."""
    from blobstore.store import Store
    from tests.blobstore.gcutil import add_model

    with pytest.raises(InvalidName, match="host longer than 255"):
        ModelName.parse("h" * 256 + "/n/m:t")
    store = Store(tmp_path / "s")
    name = add_model(store, "h" * 255 + "/" + "n" * 80 + "/" + "m" * 80 + ":" + "t" * 80,
                     [b"w" * 10])
    assert store.has_model(name) and store.list_models()[0].name == name


_first = st.sampled_from("abcXYZ019_")
_rest = st.text("abcdefXYZ0123456789_-", max_size=20)
_dotted = st.text("abcXYZ019_-.", max_size=20)


@st.composite
def names(draw: st.DrawFn) -> tuple[str, str, str, str]:
    host = draw(_first) + draw(_dotted).replace("..", "._") + draw(
        st.sampled_from(["", ":5000", ":1"]))
    ns = draw(_first) + draw(_rest)
    model = draw(_first) + draw(_dotted)
    tag = draw(_first) + draw(_dotted)
    return host, ns, model, tag


@given(names())
def test_roundtrip(parts: tuple[str, str, str, str]) -> None:
    if parts[0].lower() in ("hf", "huggingface", "ollama"):
        return
    n = ModelName(*parts)
    assert ModelName.parse(str(n)).parts == parts
    assert ModelName.parse(n.display()) == n


@given(st.text(max_size=120))
def test_any_text_is_refused_or_stays_inside_manifests(text: str) -> None:
    try:
        n = ModelName.parse(text)
    except InvalidName:
        return
    root = Path("/store")
    p = Layout(root).manifest(n)
    assert p.resolve().is_relative_to(root / "manifests")
    assert len(p.relative_to(root / "manifests").parts) == 4
    for part in n.parts:
        assert part not in (".", "..") and "/" not in part and "\0" not in part


def test_an_invalid_name_is_shown_as_written() -> None:
    """Found from outside: 'bad name!!' was reported as 'registry.ollama.ai/library/bad
    name!!:latest', a name the user never wrote."""
    with pytest.raises(InvalidName) as info:
        ModelName.parse("bad name!!")
    assert info.value.message.startswith("invalid model name 'bad name!!': ")
    with pytest.raises(InvalidName) as info:
        ModelName.parse("ns/-m:t")
    assert info.value.name == "ns/-m:t"
