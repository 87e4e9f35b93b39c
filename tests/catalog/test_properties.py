"""Properties searched by hypothesis: the quantization parser, the recommendation rule,
and an HF download interrupted at any offset then resumed."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blobstore.name import ModelName
from blobstore.store import Store
from catalog.catalog import Catalog, CatalogEntry, load_catalog
from catalog.errors import NothingFits
from catalog.hf import pull_file, quant_of
from catalog.recommend import Machine, fits, recommend
from registry_client.errors import RegistryError
from registry_client.pull import PullOptions
from registry_client.retry import RetryPolicy
from tests.helpers import make_gguf
from tests.hfserver import CDNServer, HFServer


@given(st.text(max_size=80))
def test_quant_of_never_fails_and_names_a_part_of_the_file(name: str) -> None:
    q = quant_of(name)
    if q is not None:
        assert q == q.upper() and q.lower() in name.lower()


@given(st.sampled_from(["Q4_K_M", "Q5_K_S", "Q8_0", "IQ4_XS", "IQ2_XXS", "F16", "BF16",
                        "Q6_K", "Q3_K_L"]),
       st.sampled_from(["Model-7B-Instruct", "qwen2.5-coder-7b", "phi-4", "a"]),
       st.sampled_from(["-", ".", "_"]), st.booleans())
def test_quant_of_finds_the_quantization(quant: str, stem: str, sep: str, lower: bool) -> None:
    name = f"{stem}{sep}{quant.lower() if lower else quant}.gguf"
    assert quant_of(name) == quant


_SHIPPED = load_catalog(False)


GIB = 1024 ** 3


def _budget(ram: int, gpu: int) -> int:
    """spec/catalog.md, "recommend", written out again here (not the code's own rule):
    available RAM less the 2 GiB reserve, never below zero, plus free GPU memory."""
    return (ram - 2 * GIB if ram > 2 * GIB else 0) + gpu


def _fits(ram_required: int, file_size: int, ram: int, gpu: int, disk: int | None) -> bool:
    return ram_required <= _budget(ram, gpu) and (disk is None or file_size <= disk)


@given(ram=st.integers(0, 80 << 30), gpu=st.integers(0, 24 << 30),
       disk=st.none() | st.integers(0, 20 * 10**9),
       flags=st.lists(st.booleans(), min_size=len(_SHIPPED.entries),
                      max_size=len(_SHIPPED.entries)))
def test_recommend_rule(ram: int, gpu: int, disk: int | None, flags: list[bool]) -> None:
    entries = [replace(e, recommended=f) for e, f in zip(_SHIPPED.entries, flags, strict=True)]
    cat = Catalog(entries)
    m = Machine(ram, None, gpu, "test", disk)
    assert m.memory_budget == _budget(ram, gpu)
    fitting = [e for e in entries if _fits(e.ram_required, e.file_size, ram, gpu, disk)]
    assert [e for e in entries if fits(e, m)] == fitting
    if not fitting:
        with pytest.raises(NothingFits) as exc:
            recommend(cat, m)
        smallest = min(entries, key=lambda e: (e.ram_required, e.file_size))
        assert smallest.id in exc.value.message
        # the hint names what is short (found from outside: a full disk with memory to
        # spare was told to "close programs to free memory")
        hint = exc.value.hint or ""
        memory_short = all(e.ram_required > _budget(ram, gpu) for e in entries)
        disk_short = disk is not None and all(
            e.file_size > disk for e in entries
            if memory_short or e.ram_required <= _budget(ram, gpu))
        assert ("memory" in hint) == memory_short, (hint, memory_short)
        assert ("disk" in hint) == disk_short, (hint, disk_short)
        return
    best = recommend(cat, m).entry
    pool = [e for e in fitting if e.recommended] or fitting
    assert best in pool
    assert best.ram_required == max(e.ram_required for e in pool)


def _entry(i: int, ram: int) -> CatalogEntry:
    return CatalogEntry(f"m{i}", "M", "", "", "", 0, ram // 2, ram, "lite", (), False, "",
                        ModelName.parse(f"x/m{i}:1"))


@given(st.lists(st.integers(1, 10**10), min_size=1, max_size=8), st.integers(0, 20 << 30),
       st.integers(0, 8 << 30))
def test_nothing_fits_exactly_when_no_entry_does(rams: list[int], ram: int, gpu: int) -> None:
    cat = Catalog([_entry(i, r) for i, r in enumerate(rams)])
    m = Machine(ram, None, gpu, "nvidia-smi" if gpu else "none detected", None)
    if any(r <= _budget(ram, gpu) for r in rams):
        assert recommend(cat, m).entry.ram_required == max(
            r for r in rams if r <= _budget(ram, gpu))
    else:
        with pytest.raises(NothingFits):
            recommend(cat, m)


def test_spec_states_the_budget_rule_the_code_applies() -> None:
    """The formula above is the spec's, word for word (a divergence fails here)."""
    spec = (Path(__file__).parents[2] / "spec" / "catalog.md").read_text()
    section = " ".join(spec[spec.index("## recommend"):spec.index("## Hugging Face")].split())
    assert "`ram_required` ≤ max(0, RAM \u2212 reserve) + GPU" in section  # U+2212 minus
    # below the reserve, GPU memory alone is the budget (not GPU minus the shortfall)
    assert Machine(1 * GIB, None, 4 * GIB, "nvidia-smi", None).memory_budget == 4 * GIB


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(fail_from=786433, chunk=256 << 10)  # past the last chunk start: the first pull works
@given(fail_from=st.integers(0, 1_100_000), chunk=st.sampled_from([16 << 10, 64 << 10, 256 << 10]))
def test_hf_download_interrupted_anywhere_then_resumed(tmp_path_factory: pytest.TempPathFactory,
                                                       fail_from: int, chunk: int) -> None:
    tmp = tmp_path_factory.mktemp("p")
    data = make_gguf(tmp / "m.gguf", n_embd=256, n_vocab=700, layers=1, seed=3).read_bytes()
    cdn = CDNServer().start()
    hub = HFServer(cdn).start()
    old = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = hub.url
    try:
        hub.add_file("o/r", "m-Q4_K_M.gguf", data)
        store = Store(tmp / "s")
        opts = PullOptions(connections=3, chunk_size=chunk,
                           retry=RetryPolicy(attempts=1, base_delay=0.0))
        cdn.fail_from = fail_from
        try:
            pull_file(store, "o", "r", "m-Q4_K_M.gguf", options=opts)
            first_ok = True
        except RegistryError:
            first_ok = False
            assert store.list_models() == []
            assert not any((store.root / "blobs").iterdir())
        # the CDN resets ranges that *start* at or past fail_from (no retries here): the
        # first pull fails exactly when one did (fail_from=786433 with 256 KiB chunks: none)
        starts = [int(x.headers["Range"].split("=")[1].split("-")[0]) for x in cdn.log
                  if "Range" in x.headers and x.method == "GET"]
        assert len(data) > 256 << 10 and starts
        assert first_ok == (not any(x >= fail_from for x in starts))
        cdn.fail_from = None
        res = pull_file(store, "o", "r", "m-Q4_K_M.gguf", options=opts)
        assert res.bytes_fetched + res.bytes_resumed == (0 if first_ok else len(data))
        path = store.resolve(ModelName.parse("hf.co/o/r:Q4_K_M")).model_path
        assert path is not None and hashlib.sha256(path.read_bytes()).digest() == \
            hashlib.sha256(data).digest()
    finally:
        if old is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = old
        hub.stop()
        cdn.stop()


@given(up=st.integers(0, 3), changed=st.integers(0, 3), gone=st.integers(0, 3),
       unreadable=st.integers(0, 3), failed=st.integers(0, 3))
def test_outdated_summary_is_true_for_every_mix(up: int, changed: int, gone: int,
                                                unreadable: int, failed: int) -> None:
    """The outdated/update summary states each kind's count and says "up to date" of all
    only when every model is (found from outside: "all 0 checked models are up to date"
    when the only model was gone from its registry)."""
    import re

    from blobstore.digest import Digest
    from catalog.updates import Change, OutdatedReport
    from registry_client.errors import TransferError

    names = iter(ModelName.parse(f"m{i}:1") for i in range(20))
    d1, d2 = Digest.of_bytes(b"1"), Digest.of_bytes(b"2")
    report = OutdatedReport(checked=up + changed,
                            changed=[Change(next(names), d1, d2) for _ in range(changed)],
                            failures=[(next(names), TransferError("down"))
                                      for _ in range(failed)],
                            gone=[next(names) for _ in range(gone)],
                            unreadable=[next(names) for _ in range(unreadable)])
    text = report.summary()
    total = up + changed + gone + unreadable + failed
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    assert "all 0" not in text and "0 checked" not in text
    if total == 0:
        assert text == "no models to check"
        return
    # "all"/"the" (every model up to date) only when it is so, and "up to date" never
    # without its true count
    assert ("all " in text or text.startswith("the ")) == (up == total)
    if up == total:
        assert numbers == [up] and "up to date" in text
    elif failed == total:
        assert text == f"no model could be checked ({total} failed)"
    else:
        assert numbers[:2] == [up, total] and f"{up} of {total} model" in text
        said = dict((what, n) for n, what in re.findall(
            r"(\d+) (outdated|not in the registry|with an unreadable local manifest|"
            r"could not be checked)", text))
        want = {"outdated": changed, "not in the registry": gone,
                "with an unreadable local manifest": unreadable,
                "could not be checked": failed}
        assert said == {k: str(v) for k, v in want.items() if v}

