"""The login flow cookie (lapse.sso.flow): bound to the browser, tamper-evident, short-lived."""

from __future__ import annotations

import base64
import hashlib

from hypothesis import given
from hypothesis import strategies as st

from lapse.sso.flow import FLOW_TTL, Flows

T = 1_800_000_000.0
FLOWS = Flows(b"k" * 32)


def test_a_flow_round_trips_and_derives_pkce_s256() -> None:
    flow = FLOWS.start("/x?y=1", T, max_age=300)
    back = FLOWS.load(FLOWS.dump(flow), T + 1)
    assert back == flow
    verifier = FLOWS.verifier(flow)
    assert 43 <= len(verifier) <= 128
    digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    assert FLOWS.challenge(flow) == digest  # RFC 7636 4.2
    assert FLOWS.state_matches(flow, FLOWS.state(flow)) and not FLOWS.state_matches(flow, None)
    assert len({FLOWS.state(flow), FLOWS.nonce(flow), verifier}) == 3


def test_old_foreign_or_tampered_cookies_are_refused() -> None:
    flow = FLOWS.start("/", T)
    cookie = FLOWS.dump(flow)
    assert FLOWS.load(cookie, T + FLOW_TTL + 1) is None
    assert FLOWS.load(cookie, T - 5) is None
    assert Flows(b"j" * 32).load(cookie, T) is None  # another gateway's key
    other = FLOWS.start("/", T)
    assert not FLOWS.state_matches(other, FLOWS.state(flow))  # another browser's state


@given(st.text(max_size=200))
def test_no_made_up_cookie_loads(cookie: str) -> None:
    assert FLOWS.load(cookie, T) is None


@given(st.integers(min_value=0, max_value=200), st.characters(codec="ascii"))
def test_changing_any_character_of_a_cookie_is_noticed(at: int, char: str) -> None:
    cookie = FLOWS.dump(FLOWS.start("/next", T))
    at %= len(cookie)
    changed = cookie[:at] + char + cookie[at + 1:]
    if changed != cookie:
        assert FLOWS.load(changed, T) is None
