"""``SessionKeys`` is ``session_key`` (HMAC-SHA256), only with the pads hashed once: the same keys."""

from __future__ import annotations

import pytest

from lapse.core.session import SessionKeys, session_key
from lapse.enforce import new_session_id


@pytest.mark.parametrize("secret", [b"", b"k", bytes(range(32)), bytes(range(64)), bytes(range(65)) * 3])
def test_the_same_key_as_hmac_for_every_secret_length(secret):
    keys = SessionKeys(secret)
    for session_id in ("", "x", new_session_id(), "é" * 100, new_session_id()):
        assert keys(session_id) == session_key(secret, session_id)
