"""``[store] url`` for Redis: every deployment form parses, and a bad one names what is wrong."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lapse.config import ConfigError, parse_config
from lapse.store.redis_url import RedisTarget, parse_redis_url, redact


@pytest.mark.parametrize("url, expected", [
    ("redis://127.0.0.1:6380/2", RedisTarget("standalone", False, (("127.0.0.1", 6380),), db=2)),
    ("redis://cache", RedisTarget("standalone", False, (("cache", 6379),))),
    ("rediss://u:p%40ss@cache:6390/0?timeout=0.25&ssl_ca_certs=/etc/ca.pem",
     RedisTarget("standalone", True, (("cache", 6390),), username="u", password="p@ss", timeout=0.25,
                 tls_options={"ssl_ca_certs": "/etc/ca.pem"})),
    ("redis://s3cret@cache/1", RedisTarget("standalone", False, (("cache", 6379),), db=1, password="s3cret")),
    ("redis://:Zk9%2Fx+Qe3%3FT%23q=@cache/1", RedisTarget("standalone", False, (("cache", 6379),), db=1,
                                                        password="Zk9/x+Qe3?T#q=")),
    ("redis://:p@ss@cache/1", RedisTarget("standalone", False, (("cache", 6379),), db=1, password="p@ss")),
    ("redis+sentinel://:pw@s1,s2:26380/mymaster/3?sentinel_password=spw",
     RedisTarget("sentinel", False, (("s1", 26379), ("s2", 26380)), db=3, password="pw", service="mymaster",
                 sentinel_password="spw")),
    ("rediss+cluster://n1:7000,n2:7001,[::1]:7002?prefix=prod:&audit_maxlen=5000",
     RedisTarget("cluster", True, (("n1", 7000), ("n2", 7001), ("::1", 7002)), prefix="prod:", audit_maxlen=5000)),
])
def test_every_form_parses(url: str, expected: RedisTarget) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize("url, says", [
    ("redis://:6379/0", "bad host"),
    ("redis://a:1,b:2/0", "several hosts"),
    ("redis://cache/x", "must be a number"),
    ("redis://cache:99999/0", "out of range"),
    ("redis+sentinel://s1:26379", "master's name"),
    ("redis+cluster://n1:7000/1", "no database"),
    ("redis://cache/0?timeout=0", "positive"),
    ("redis://cache/0?prefix=a{b}", "braces"),
    ("redis://cache/0?ssl_ca_certs=/x", "unknown option"),  # TLS options only with rediss
    ("redis://cache/0?colour=blue", "unknown option 'colour'"),
])
def test_bad_urls_say_why(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_redis_url(url)


def test_config_checks_the_url_with_the_same_parser() -> None:
    assert parse_config('[store]\nurl = "redis+cluster://n1:7000,n2:7000"\n').config.store.kind == "redis"
    with pytest.raises(ConfigError, match="store.url.*Sentinel needs the master's name"):
        parse_config('[store]\nurl = "redis+sentinel://s1:26379"\n')


def test_redacted_has_no_credentials() -> None:
    target = parse_redis_url("rediss+sentinel://user:hunter2@s1,s2/main/1")
    assert target.redacted() == "rediss+sentinel://s1:26379,s2:26379/main/1"
    assert "hunter2" not in target.redacted()


# "~" never appears in lapse's messages, so a secret found in one is a leak, not a shared word.
secret = st.text(alphabet=st.characters(codec="ascii", exclude_characters="\n\r"), max_size=20).map(lambda s: s + "~")


@settings(max_examples=500)
@example(user="", password="][~", sentinel="~", host="h:1", tail="")  # "]": urlsplit's IPv6 error quoted the host
@given(user=st.from_regex(r"[a-z]{0,8}", fullmatch=True), password=secret, sentinel=secret,
       host=st.sampled_from(["h:1", ":6379", "a:1,b:2", "[::1]:7000"]), tail=st.sampled_from(["", "/0", "/m/0?timeout=1"]))
def test_no_password_shows_in_any_message(user, password, sentinel, host, tail):
    """The start-up line and config errors quote store URLs, good or bad: no password ever shows."""
    for scheme in ("redis", "redis+sentinel", "valkey"):
        url = f"{scheme}://{user}{':' if user else ''}{password}@{host}{tail}"
        url += f"{'&' if '?' in tail else '?'}sentinel_password={sentinel}"
        shown = [redact(url)]
        try:
            parse_redis_url(url)
        except ValueError as exc:
            shown.append(str(exc))
        with pytest.raises(ConfigError) if scheme == "valkey" else _maybe():
            parse_config(f'[store]\nurl = {json.dumps(url)}\n')
        for text in shown:
            assert password not in text and sentinel not in text


def _maybe():  # a URL that happens to be valid loads; a bad one is a ConfigError (checked above for leaks)
    return contextlib.suppress(ConfigError)
