"""HMAC-signed bearer tokens of the /token flow (registry_server/auth/signed.py)."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from registry_server.auth import signed
from registry_server.auth.signed import Grant, SignedToken

SECRET = b"k" * 32
NOW = 1_800_000_000

grants = st.lists(st.builds(Grant, st.text("abc/.:-", min_size=1, max_size=20),
                            st.sampled_from([("pull",), ("push",), ("pull", "push")])),
                  max_size=4).map(tuple)
tokens = st.builds(SignedToken, st.text(max_size=12), st.text("0123456789abcdef", max_size=16),
                   st.just(NOW), st.integers(NOW + 1, NOW + 10_000), grants)


@given(tokens)
def test_round_trip(tok: SignedToken) -> None:
    assert signed.verify(SECRET, signed.sign(SECRET, tok), now=NOW) == tok


@given(tokens, st.data())
@settings(max_examples=300)
def test_mutated_tokens_are_never_accepted(tok: SignedToken, data: st.DataObject) -> None:
    text = signed.sign(SECRET, tok)
    kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "swap_payload"]))
    i = data.draw(st.integers(0, len(text) - 1))
    if kind == "flip":
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "
        c = data.draw(st.sampled_from(alphabet).filter(lambda c: c != text[i]))
        bad = text[:i] + c + text[i + 1:]
    elif kind == "insert":
        bad = text[:i] + data.draw(st.text(min_size=1, max_size=3)) + text[i:]
    elif kind == "delete":
        bad = text[:i] + text[i + 1:]
    elif kind == "truncate":
        bad = text[:i]
    else:  # a payload granting more, under the original MAC
        other = SignedToken(tok.subject, tok.fingerprint, tok.issued_at, tok.expires_at + 1,
                            (*tok.access, Grant("library/x", ("pull", "push"))))
        forged = signed.sign(SECRET, other)
        bad = forged.rpartition(".")[0] + "." + text.rpartition(".")[2]
    got = signed.verify(SECRET, bad, now=NOW)
    # a mutation may only ever give back the very token that was signed, never another
    assert got is None or (got == tok and bad == text)


@given(tokens)
def test_another_secret_or_expiry_refuses(tok: SignedToken) -> None:
    text = signed.sign(SECRET, tok)
    assert signed.verify(b"j" * 32, text, now=NOW) is None
    assert signed.verify(SECRET, text, now=tok.expires_at) is None
    assert signed.verify(SECRET, text, now=tok.expires_at - 1) == tok
    assert signed.verify(SECRET, text, now=NOW - 3600) is None  # issued in the future


def test_shape_is_compact_and_opaque() -> None:
    tok = SignedToken("alice", "0123456789abcdef", int(time.time()), int(time.time()) + 300,
                      (Grant("library/llama3", ("pull",)),))
    text = signed.sign(SECRET, tok)
    assert text.startswith("b1.") and text.count(".") == 2 and len(text) < 200
    assert signed.verify(SECRET, text) == tok
    assert tok.allows("library/llama3", "pull") and not tok.allows("library/llama3", "push")
    assert not tok.allows("library/llama", "pull")
