from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobstore.errors import InvalidInput, InvalidSize
from blobstore.units import human_bytes, human_number, parse_duration, parse_size


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("1234", 1234), ("50G", 50 * 2**30), ("50GiB", 50 * 2**30),
    ("50GB", 50 * 10**9), ("50g", 50 * 2**30), ("50gb", 50 * 10**9), ("1.5G", 3 * 2**29),
    ("10K", 10240), ("10KB", 10000), ("2M", 2 * 2**20), ("1T", 2**40), ("7B", 7),
    (" 3 MiB ", 3 * 2**20),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-5G", "5X", "5Gi", "1.5", "five", "5 G B", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidSize):
        parse_size(text)


@given(st.integers(0, 2**32), st.sampled_from(["", "K", "M", "G", "KiB", "GiB", "KB", "GB"]))
def test_parse_size_units(n: int, unit: str) -> None:
    scale = {"": 1, "K": 1024, "M": 2**20, "G": 2**30, "KiB": 1024, "GiB": 2**30,
             "KB": 1000, "GB": 10**9}[unit]
    assert parse_size(f"{n}{unit}") == n * scale


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (999, "999 B"), (1000, "1 KB"), (1500, "1.5 KB"), (93941, "93 KB"),
    (4_661_224_676, "4.7 GB"), (2_000_000_000, "2 GB"), (12_300_000_000, "12 GB"),
    (10**12, "1 TB"),
])
def test_human_bytes_matches_ollama(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(("n", "text"), [
    (8_030_261_248, "8.0B"), (7_000_000_000, "7B"), (494_032_768, "494.03M"),
    (135_000_000, "135M"), (23_456, "23K"), (999, "999"),
])
def test_human_number_matches_ollama(n: int, text: str) -> None:
    assert human_number(n) == text


def test_parse_duration() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("1h") == 3600
    assert parse_duration("0") == 0
    with pytest.raises(InvalidInput):
        parse_duration("soon")


# --- ASCII only (found from outside: 'gc --max-size' with a fullwidth 9 was taken as 9 bytes)
@pytest.mark.parametrize("text", [
    "\uff19",  # fullwidth 9
    "1\uff10K",  # 1, fullwidth 0, K
    "\u0665G",  # Arabic-Indic 5
    "5\u212a",  # Kelvin sign, which IGNORECASE took for k
    "5\u3000G",  # ideographic space
])
def test_parse_size_takes_ascii_only(text: str) -> None:
    with pytest.raises(InvalidSize):
        parse_size(text)


@pytest.mark.parametrize("text", [
    "\uff19",  # fullwidth 9
    "\uff11h",  # fullwidth 1, h
    "3\u017f",  # long s, which IGNORECASE took for s (then a KeyError: exit 1)
    "\u0663d",  # Arabic-Indic 3
])
def test_parse_duration_takes_ascii_only(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid duration"):
        parse_duration(text)


_NON_ASCII = st.one_of(
    # another script's digits in an otherwise good size or duration
    st.tuples(st.text(st.characters(categories=("Nd",)), min_size=1, max_size=4),
              st.sampled_from(["", "s", "h", "K", "GiB"]))
    .map("".join),
    st.text(min_size=1, max_size=12),
).filter(lambda t: not t.isascii())


@given(_NON_ASCII)
def test_sizes_and_durations_with_any_non_ascii_character_are_refused(text: str) -> None:
    with pytest.raises(InvalidSize):
        parse_size(text)
    with pytest.raises(InvalidInput):
        parse_duration(text)


@given(st.integers(0, 2**32), st.sampled_from(["", "s", "m", "h", "d", "w", "K", "GiB"]))
def test_ascii_sizes_and_durations_still_parse(n: int, unit: str) -> None:
    text = f"{n}{unit}"
    if unit in ("", "K", "GiB"):
        assert parse_size(text) == n * {"": 1, "K": 1024, "GiB": 2**30}[unit]
    if unit in ("", "s", "m", "h", "d", "w"):
        assert parse_duration(text) == n * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400,
                                            "w": 604800}[unit]
