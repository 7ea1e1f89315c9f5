"""The ASGI middleware's one-pass header read (``peek``) says what the general request reading says:
the same host, client IP (forwarded headers only from trusted proxies), passive flag and cookies."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from lapse.middleware.asgi import peek
from lapse.web.net import Trust, client_ip, header_dict

TRUST = Trust([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")])
addresses = st.sampled_from(["127.0.0.1", "10.1.2.3", "192.0.2.7", "2001:db8::1", "garbage", ""])
names = st.sampled_from([b"host", b"cookie", b"x-lapse-activity", b"x-forwarded-for", b"x-real-ip",
                         b"user-agent", b"x-forwarded-host"])
values = st.one_of(addresses, st.sampled_from(["passive", "PASSIVE", "active", "a=1; b=2", "192.0.2.7, 10.0.0.1"]),
                   st.text(alphabet=st.characters(codec="latin-1"), max_size=20)).map(lambda v: v.encode("latin-1"))


def reference(enf, scope):
    """What the middleware read before ``peek`` (a dict of the wanted headers, then client_ip)."""
    client = scope.get("client")
    peer = client[0] if client else None
    headers = header_dict(scope["headers"], frozenset({b"host", b"cookie", b"x-lapse-activity",
                                                       b"x-forwarded-for", b"x-real-ip"}))
    ip = client_ip(peer, headers, enf.trust)
    return (enf.app_host or headers.get("host", ""), ip, headers.get("x-lapse-activity", "").lower() == "passive",
            headers.get("cookie", ""))


@settings(max_examples=500)
@given(headers=st.lists(st.tuples(names, values), max_size=8), peer=st.one_of(st.none(), addresses),
       app_host=st.sampled_from(["", "app.example"]))
def test_peek_reads_what_the_dict_reads(headers, peer, app_host):
    enf = SimpleNamespace(trust=TRUST, app_host=app_host)
    scope = {"headers": headers, "client": None if peer is None else (peer, 1234)}
    assert peek(enf, scope) == reference(enf, scope)


def test_forwarded_for_counts_only_from_a_trusted_proxy():
    enf = SimpleNamespace(trust=TRUST, app_host="")
    headers = [(b"host", b"h"), (b"x-forwarded-for", b"198.51.100.9")]
    assert peek(enf, {"headers": headers, "client": ("10.0.0.5", 1)})[1] == "198.51.100.9"
    assert peek(enf, {"headers": headers, "client": ("192.0.2.7", 1)})[1] == "192.0.2.7"
