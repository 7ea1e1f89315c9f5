"""The session cookie read from a ``Cookie`` header: remembered per header, never different for it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lapse.web import tokens
from lapse.web.tokens import Cookies, parse_cookies, valid_id

NAME = "__Host-lapse"
_part = st.one_of(
    st.tuples(st.sampled_from([NAME, "other", "lapse", f" {NAME}", f"{NAME}x"]),
              st.text(max_size=30) | st.from_regex(r"[A-Za-z0-9_-]{20,40}", fullmatch=True)),
    st.tuples(st.text(max_size=10), st.text(max_size=10)),
)
headers = st.lists(_part, max_size=6).map(lambda parts: "; ".join(f"{k}={v}" for k, v in parts)) | st.text(max_size=60)


@settings(max_examples=300)
@given(st.lists(headers, min_size=1, max_size=8))
def test_the_same_value_as_parsing_the_header(seen):
    cookies = Cookies(NAME, secure=True)
    for header in seen + seen:  # the second pass comes from memory
        sid = parse_cookies(header).get(NAME)
        assert cookies.session_id(header) == sid
        assert cookies.presented(header) == (sid, sid if sid is None or valid_id(sid) else "invalid")


def test_memory_is_bounded_and_long_headers_are_not_kept(monkeypatch):
    monkeypatch.setattr(tokens, "_SEEN_MAX", 2)
    cookies = Cookies(NAME, secure=True)
    for n in range(6):
        assert cookies.session_id(f"{NAME}=id{n}") == f"id{n}"
        assert len(cookies._seen) <= 2
    long = f"a={'x' * tokens._SEEN_LONGEST}; {NAME}=late"
    assert cookies.session_id(long) == "late"
    assert long not in cookies._seen
