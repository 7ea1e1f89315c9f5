"""``SessionKeys`` is ``session_key`` (HMAC-SHA256), only with the pads hashed once: the same keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lapse.core import session as session_module
from lapse.core.session import SessionKeys, session_key
from lapse.enforce import new_session_id


@pytest.mark.parametrize("secret", [b"", b"k", bytes(range(32)), bytes(range(64)), bytes(range(65)) * 3])
def test_the_same_key_as_hmac_for_every_secret_length(secret):
    keys = SessionKeys(secret)
    for session_id in ("", "x", new_session_id(), "é" * 100, new_session_id()):
        assert keys(session_id) == session_key(secret, session_id)


@settings(max_examples=200)
@given(secret=st.binary(max_size=80), ids=st.lists(st.text(max_size=60), max_size=12))
def test_remembered_keys_are_the_keys(secret, ids):
    """Asked again (remembered) or after the memory was forgotten when full: always the HMAC."""
    keys = SessionKeys(secret)
    for session_id in ids + ids[::-1]:
        assert keys(session_id) == session_key(secret, session_id)


def test_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(session_module, "_KNOWN_MAX", 3)
    keys = SessionKeys(b"k")
    for n in range(10):
        assert keys(str(n)) == session_key(b"k", str(n))
        assert len(keys._known) <= 3
