"""``[store] url`` for Redis: the four deployments and their options, parsed without touching Redis.

Pure, so ``lapse policy check`` can name a bad URL without a connection::

    redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]              one server
    rediss://...                                                      the same over TLS
    redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?OPTIONS]
    redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][?OPTIONS]
    (rediss+sentinel:// and rediss+cluster:// for TLS)

OPTIONS: ``timeout`` (seconds for every connect and every reply; default 1),
``prefix`` (of every key; default ``lapse:``, so several deployments can share
one Redis or Cluster), ``audit_maxlen`` (the audit stream's cap; default
1000000), ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``,
``ssl_cert_reqs`` (``required``/``optional``/``none``) for TLS. With Sentinel,
the password is the data nodes'; ``sentinel_password`` is the sentinels'.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

SCHEMES = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
DEFAULT_PORT = {"standalone": 6379, "sentinel": 26379, "cluster": 6379}
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
DEFAULT_TIMEOUT = 1.0
DEFAULT_PREFIX = "lapse:"
DEFAULT_AUDIT_MAXLEN = 1_000_000


@dataclass(frozen=True)
class RedisTarget:
    kind: Literal["standalone", "sentinel", "cluster"]
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr that reaches a log
    service: str | None = None  # Sentinel: the monitored master's name
    sentinel_password: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    prefix: str = DEFAULT_PREFIX
    audit_maxlen: int = DEFAULT_AUDIT_MAXLEN
    tls_options: dict[str, str] = field(default_factory=dict)

    def redacted(self) -> str:
        """Where it points, for log lines: no credentials."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        scheme = next(s for s, v in SCHEMES.items() if v == (self.kind, self.tls))
        tail = f"/{self.service}" if self.service else ""
        return f"{scheme}://{hosts}{tail}/{self.db}" if self.kind != "cluster" else f"{scheme}://{hosts}"


def is_redis_url(url: str) -> bool:
    return url.split("://", 1)[0] in SCHEMES and "://" in url


_CREDENTIALS = re.compile(r"^([^:/?#]*://).*@")  # greedy, to the last "@": more hidden rather than less
_QUERY_PASSWORD = re.compile(r"(?i)((?:^|[?&])(?:sentinel_)?password=).*")  # to the end: "&", "#" may be its


def redact(url: str) -> str:
    """Any URL as given, for messages, with its credentials and password options replaced by ``***``
    (it may not parse: a wrong one is exactly what an error message quotes)."""
    return _CREDENTIALS.sub(r"\1***@", _QUERY_PASSWORD.sub(r"\1***", url), count=1)


def unreadable_files(target: RedisTarget) -> list[str]:
    """The TLS files named in the URL that this process cannot read (``option=path: why``)."""
    problems = []
    for name, path in target.tls_options.items():
        if name != "ssl_cert_reqs" and not os.access(path, os.R_OK):
            why = "no such file" if not os.path.exists(path) else "not readable"
            problems.append(f"{name}={path}: {why}")
    return problems


def parse_redis_url(url: str) -> RedisTarget:
    """A ``RedisTarget``, or ``ValueError`` saying what is wrong with the URL."""
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES or not _:
        raise ValueError(f"scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    kind, tls = SCHEMES[scheme]
    # Error messages quote pieces of the URL only when it holds no "@": a password that should have
    # been percent-encoded ("/", "?", "#") would otherwise land, cut, where a host or option is read.
    quote = "@" not in rest
    try:
        parts = urlsplit("x://" + rest)  # brackets are IPv6 hosts to it: "]" in a password lands there
    except ValueError as exc:
        raise ValueError(f"malformed URL: {exc}" if quote else f"malformed URL ({_ENCODE})") from None
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        creds, netloc = netloc.rsplit("@", 1)
        user, has_pw, pw = creds.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if has_pw else None
        if not has_pw:  # redis://secret@host: a bare credential is the password (requirepass)
            username, password = None, unquote(user)
    hosts = tuple(_host(h, DEFAULT_PORT[kind], quote) for h in netloc.split(",")) if netloc else ()
    if not hosts:
        raise ValueError("no host")
    if kind == "standalone" and len(hosts) > 1:
        raise ValueError("several hosts need redis+sentinel:// or redis+cluster://")
    segments = [s for s in parts.path.split("/") if s]
    service = None
    if kind == "sentinel":
        if not segments:
            raise ValueError("Sentinel needs the master's name: redis+sentinel://HOST:26379/NAME[/DB]")
        service, segments = unquote(segments[0]), segments[1:]
    if kind == "cluster" and segments:
        raise ValueError("a Cluster has no database number")
    if len(segments) > 1 or (segments and not segments[0].isdigit()):
        raise ValueError("the database must be a number")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    target = {
        "kind": kind, "tls": tls, "hosts": hosts, "db": int(segments[0]) if segments else 0,
        "username": username, "password": password, "service": service,
    }
    for name, value in options.items():
        if name == "timeout":
            target["timeout"] = _positive(name, value)
        elif name == "prefix":
            if not value or "{" in value or "}" in value:
                raise ValueError("prefix must be non-empty, without braces (they are Cluster hash tags)")
            target["prefix"] = value
        elif name == "audit_maxlen":
            target["audit_maxlen"] = int(_positive(name, value))
        elif name == "sentinel_password" and kind == "sentinel":
            target["sentinel_password"] = value
        elif name in TLS_OPTIONS and tls:
            target.setdefault("tls_options", {})[name] = value
        else:
            raise ValueError(f"unknown option {name!r}" if quote else f"unknown option ({_ENCODE})")
    return RedisTarget(**target)  # type: ignore[arg-type]


_ENCODE = "not shown: the URL holds credentials; a password with '/', '?' or '#' must be percent-encoded"


def _host(text: str, default_port: int, quote: bool = True) -> tuple[str, int]:
    parts = urlsplit("x://" + text)
    try:
        if not parts.hostname:
            raise ValueError("no host name")
        return parts.hostname, parts.port or default_port  # .port raises ValueError on a bad one
    except ValueError as exc:
        raise ValueError(f"bad host {text!r}: {exc}" if quote else f"bad host ({_ENCODE})") from None


def _positive(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise ValueError(f"{name} must be a positive number")
    return number
