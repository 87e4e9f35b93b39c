"""One bad row of the benchmark history never takes down a view that reads it.

Found from outside: one run with ``started_at: 1e20`` (it still decodes) made
``bench --history``, ``compare --json`` and ``compare --csv`` exit 1 ("timestamp out of
range for platform time_t") and serve's page answer 500; one run whose ``name`` does not
parse made plain ``compare`` exit 4 for every model. Hypothesis writes a hostile value
into one field of one row (next to a good row of the same model and a good model),
and every reader still shows the good rows.

No llama-cpp-python needed: the history is written directly.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blobstore import ModelName, Store
from blobstore.benchlog import BenchRun, History, LlamaPerf
from registry_server.context import ServerContext
from tests.cli.clirun import run, run_proc
from tests.registry_server.webfix import make_ctx, page_server

GOOD = "registry.ollama.ai/library/good:1"
MIXED = "registry.ollama.ai/library/mixed:1"


def good_run(name: str, tps: float) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.to_builtins(BenchRun(
        name=name, model_digest="sha256:" + "0" * 64, manifest_digest="sha256:" + "1" * 64,
        started_at=1_700_000_000.0, prompt_tokens=8, generated_tokens=32,
        load_seconds=0.01, prompt_seconds=0.002, generation_seconds=0.004,
        ttft_seconds=0.0025, prompt_tps=4000.0, generation_tps=tps, peak_rss=50 << 20,
        rss_before_load=40 << 20, context_used=40, context_size=128, n_gpu_layers=0,
        n_threads=2, llama_cpp_version="0.3.x", llama=LlamaPerf(1.0, 2.0, 8, 4.0, 31)))
    return doc


FIELDS = [*sorted(good_run(GOOD, 1.0)), "llama.load_ms", "llama.eval_tokens"]
HOSTILE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e20, -1e15, 1.7e308, 253402300800.0, -1.0, 0.0]),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.text(max_size=30),
    st.sampled_from(["x y z", "", " a", "a:b:c", "A" * 700, "UPPER/Case:1", "\x00",
                     None, [], {}, True]),
)


def write_file(store: Store, name: str, runs: list[Any], key: str | None = None) -> None:
    d = store.root / ".blobctl" / "bench"
    d.mkdir(parents=True, exist_ok=True)
    key = key or hashlib.sha256(ModelName.parse(name).key.encode()).hexdigest()[:32]
    # msgspec writes NaN and infinities as null: JSON has neither
    (d / f"{key}.json").write_bytes(msgspec.json.encode({"name": name, "runs": runs}))


def plant(store: Store, field: str, value: Any, last: bool) -> None:
    """GOOD: one sane run. MIXED: a sane run and one with ``field`` = ``value``.
    Another file named ``value`` (when it is a string) holds one sane run of that name."""
    bad = good_run(MIXED, 2.0)
    if "." in field:
        outer, inner = field.split(".")
        bad[outer][inner] = value
    else:
        bad[field] = value
    write_file(store, GOOD, [good_run(GOOD, 1.0)])
    sane = good_run(MIXED, 3.0)
    write_file(store, MIXED, [sane, bad] if last else [bad, sane])
    if isinstance(value, str):
        write_file(store, GOOD, [good_run(value, 5.0)], key="f" * 32)


def check_cli(store: Store) -> None:
    s = str(store.root)
    for args in (["bench", "--history", MIXED], ["bench", "--history", MIXED, "--json"],
                 ["bench", "--history", MIXED, "--csv"], ["compare"], ["compare", "--json"],
                 ["compare", "--csv"], ["compare", GOOD, MIXED]):
        r = run("--store", s, *args)
        assert r.code == 0, (args, r.err)
        if args[0] == "bench":
            assert "3.0" in r.out, (args, r.out)  # the sane MIXED row
        else:
            assert "good" in r.out and "mixed" in r.out, (args, r.out)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, str]]:
    store = Store(tmp_path_factory.mktemp("hist") / "store")
    ctx: ServerContext = make_ctx(store)
    with page_server(ctx) as url:
        yield store, url


@pytest.mark.timeout(120)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=HOSTILE, last=st.booleans())
def test_one_hostile_row_is_skipped_by_every_reader(
        served: tuple[Store, str], field: str, value: Any, last: bool) -> None:
    store, url = served
    for f in (store.root / ".blobctl" / "bench").glob("*.json"):
        f.unlink()
    plant(store, field, value, last)
    check_cli(store)
    with httpx.Client(base_url=url, timeout=30) as c:
        page = c.get("/")
        assert page.status_code == 200, page.text[-2000:]
        assert "good:1" in page.text
        rows = c.get("/ui/api/bench").json()["bench"]
        assert {"good:1", "mixed:1"} <= {r["name"].rsplit("/", 1)[-1] for r in rows}, rows


@pytest.mark.timeout(30)
def test_a_skipped_row_is_one_warning_and_the_others_stay(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "s")
    plant(store, "started_at", 1e20, last=True)
    r = run_proc("--store", str(store.root), "compare")  # (a process: its own logging)
    assert r.code == 0, r.err
    assert r.err.count("warning:") == 1 and "run 2 skipped" in r.err, r.err
    assert "mixed" in r.out and "good" in r.out
    plant(store, "name", "x y z", last=True)
    r = run("--store", str(store.root), "compare")
    assert r.code == 0 and "mixed" in r.out and "good" in r.out, (r.out, r.err)
    # the web page reads the history on every request: there a skipped row is a debug line
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="blobctl.bench"):
        latest = History(store, quiet=True).all_latest()
    assert {n.split("/")[-1] for n in latest} == {"good:1", "mixed:1"}
    assert caplog.records and all(x.levelno == logging.DEBUG for x in caplog.records)
    # the next run written drops the bad row from the file
    History(store).record(ModelName.parse(MIXED), msgspec.convert(good_run(MIXED, 4.0),
                                                                   BenchRun))
    assert [x.generation_tps for x in History(store).runs(ModelName.parse(MIXED))] == [3.0, 4.0]
