"""Options objects refuse values out of range when they are made (spec/api.md,
"Options"): found from outside, ``RetryPolicy(attempts=0)`` failed a pull with an
AssertionError, ``PullOptions(chunk_size=0)`` and ``stall_timeout=-1`` with ValueErrors
from deep inside, and ``connections=0``, ``GCOptions(max_size=-5)``, ``grace=-1`` were
taken silently."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blobstore.errors import BlobctlError, InvalidInput, InvalidOption
from blobstore.gc import GCOptions
from registry_client.pull import PullOptions
from registry_client.push import PushOptions
from registry_client.retry import RetryPolicy

_values = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.sampled_from(
    [0.0, -0.5, 0.5, 2.5, -1e-9, math.nan, math.inf, -math.inf, 1 << 40, "4", b"4"]))

# field -> (count: least [, "none": None too] | seconds: "none"/"finite"/"positive")
_COUNT, _SECONDS = "count", "seconds"
_RULES: dict[type, dict[str, tuple[str, Any]]] = {
    RetryPolicy: {"attempts": (_COUNT, 1), "unreachable_attempts": (_COUNT, 1),
                  "base_delay": (_SECONDS, "finite"), "max_delay": (_SECONDS, "finite")},
    PullOptions: {"connections": (_COUNT, (1, "none")),
                  "stall_timeout": (_SECONDS, "positive finite"),
                  "window_bytes": (_COUNT, 1), "chunk_size": (_COUNT, (1, "none")),
                  "lock_poll": (_SECONDS, "positive finite")},
    PushOptions: {"chunk_size": (_COUNT, 1)},
    GCOptions: {"max_size": (_COUNT, (0, "none")), "older_than": (_SECONDS, "none"),
                "grace": (_SECONDS, ""), "ingest_grace": (_SECONDS, ""),
                "lease_ttl": (_SECONDS, "")},
}


def _valid(kind: str, rule: Any, v: object) -> bool:
    if kind == _COUNT:
        least, none_ok = (rule if isinstance(rule, tuple) else (rule, ""))
        if v is None:
            return bool(none_ok)
        return isinstance(v, int) and not isinstance(v, bool) and v >= least
    if v is None:
        return "none" in rule
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return False
    if "finite" in rule and not math.isfinite(v):
        return False
    return v > 0 if "positive" in rule else v >= 0


_FIELDS = [(cls, name) for cls, fields in _RULES.items() for name in fields]


@given(which=st.sampled_from(_FIELDS), value=_values)
def test_an_option_out_of_range_is_refused_when_made(which: tuple[type, str],
                                                     value: object) -> None:
    cls, name = which
    kind, rule = _RULES[cls][name]
    if _valid(kind, rule, value):
        assert getattr(cls(**{name: value}), name) == value
        return
    with pytest.raises(InvalidOption) as info:
        cls(**{name: value})
    err = info.value
    assert isinstance(err, InvalidInput) and isinstance(err, BlobctlError)
    assert err.name == name and f"{cls.__name__}({name}=" in err.message
    assert "must be" in err.message and "\n" not in err.message


@pytest.mark.parametrize("make", [
    lambda: RetryPolicy(attempts=0), lambda: PullOptions(chunk_size=0),
    lambda: PullOptions(stall_timeout=-1), lambda: PullOptions(connections=0),
    lambda: PullOptions(connections=-1), lambda: GCOptions(max_size=-5),
    lambda: GCOptions(grace=-1)])
def test_the_values_found_from_outside_are_invalid_input(make: Any) -> None:
    with pytest.raises(InvalidInput, match="must be"):
        make()


def test_the_defaults_and_the_clis_extremes_are_valid() -> None:
    PullOptions(), PushOptions(), GCOptions(), RetryPolicy()
    PullOptions(connections=256, stall_timeout=1, chunk_size=4096,
                retry=RetryPolicy(attempts=1, base_delay=0, unreachable_attempts=1))
    PullOptions(connections=None, chunk_size=64 << 20, stall_timeout=3600)
    GCOptions(max_size=0, grace=0, ingest_grace=0, older_than=0, lease_ttl=0)
