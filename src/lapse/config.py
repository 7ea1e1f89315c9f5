"""lapse.toml -> a typed, validated configuration (CONTRACT.md §2).

Why pydantic plus a line locator: pydantic reports every mistake with its key
path at once, :mod:`lapse.config_lines` gives each path its line, and together
``policy check`` can say ``lapse.toml:14: apps[1].idel: unknown key`` for every
problem in one run, never a traceback or a validation dump.

Conventions the policy builder relies on:

- Durations are float seconds. ``None`` means "no limit", and only idle-type
  keys (``idle``, ``org.max_idle``, ``oidc.revalidate_every``) accept ``"none"``.
- In :class:`Defaults` and :class:`App` a key left out is ``None`` ("inherit").
  ``idle`` is the one key where ``None`` is ambiguous (left out, or ``"none"``):
  ask ``table.explicit("idle")``. The built-in values for keys nobody sets
  live with the resolution rules, in ``lapse.core.policy``.
- Relative paths are resolved against the config file's folder (the current
  directory for built-in defaults) and exposed beside the raw value:
  ``server.secret_path``, ``store.sqlite_path``, ``audit.parsed_sinks``,
  ``oidc.client_secret_path``, ``postgres[i].tls_paths``.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lapse.config_lines import format_path, line_of, locate
from lapse.core.durations import format_duration, parse_duration
from lapse.core.presets import PRESETS

from .audit.remote import SPELLING as SYSLOG_SPELLING
from .audit.remote import SyslogTarget
from .audit.remote import parse_target as parse_syslog_target
from .audit.remote import redact as redact_sink
from .core.policy import (
    AppSpec,
    Layer,
    NetworkSpec,
    Policy,
    PolicySpec,
    PrivilegedSpec,
    compile_policy,
    normalize_host,
)
from .store.redis_url import is_redis_url, parse_redis_url, redact, unreadable_files

__all__ = [
    "Problem",
    "ConfigError",
    "LoadedConfig",
    "AuditSink",
    "Server",
    "Telemetry",
    "Store",
    "Audit",
    "Login",
    "Org",
    "Defaults",
    "App",
    "Privileged",
    "Network",
    "OIDC",
    "Config",
    "load_config",
    "parse_config",
    "parse_listen",
]

BUILTIN_SOURCE = "<built-in defaults>"

IPNetwork = IPv4Network | IPv6Network
OnIpChange = Literal["allow", "step_up", "revoke"]


# --------------------------------------------------------------------------
# Problems and results
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One error or warning, located by key path and (where known) line."""

    path: str
    line: int | None
    message: str

    def format(self, source: str) -> str:
        where = source if self.line is None else f"{source}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The config is invalid; ``str()`` lists every problem, one per line."""

    def __init__(self, problems: list[Problem], source: str = "<string>") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(p.format(self.source) for p in self.problems)


@dataclass(frozen=True)
class LoadedConfig:
    """A valid config, the warnings it deserves, and where it came from."""

    config: Config
    warnings: list[Problem]
    source: str
    base_dir: Path
    locations: dict[str, int] = field(default_factory=dict, repr=False)

    def format_warnings(self) -> list[str]:
        return [w.format(self.source) for w in self.warnings]


@dataclass(frozen=True, slots=True)
class AuditSink:
    """One entry of ``audit.sinks``, parsed: ``kind`` and, for jsonl, its file; for a remote syslog, its target."""

    kind: Literal["store", "stdout", "syslog", "jsonl"]
    path: Path | None
    spec: str  # as written in the file
    target: SyslogTarget | None = None  # syslog:udp|tcp|tls://HOST:PORT (beyond CONTRACT.md's "syslog")


# --------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------


def _issues(*issues: tuple[tuple[str | int, ...], str]) -> PydanticCustomError:
    """An error for keys below the model that raised it, several at once.

    A model validator can only raise one error, located at the model itself;
    the ``issues`` ride along in ``ctx`` and are expanded into one Problem per
    key (``server`` + ``("upstream",)`` -> ``server.upstream``).
    """
    return PydanticCustomError(
        "lapse_issues",
        "{summary}",
        {"summary": "; ".join(m for _, m in issues), "issues": list(issues)},
    )


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _duration(value: Any) -> float:
    return parse_duration(value)  # type: ignore[return-value]


def _idle_duration(value: Any) -> float | None:
    return parse_duration(value, allow_none=True)


Duration = Annotated[float, BeforeValidator(_duration)]
IdleDuration = Annotated[float | None, BeforeValidator(_idle_duration)]


def _cidr(value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError(f"expected a CIDR string like \"10.0.0.0/8\", got {_describe(value)}")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        hint = ""
        try:
            hint = f" (did you mean \"{ipaddress.ip_network(value, strict=False)}\"?)"
        except ValueError:
            pass
        raise ValueError(f"not a valid CIDR {json.dumps(value)}: {exc}{hint}") from None


Cidr = Annotated[IPNetwork, BeforeValidator(_cidr)]


def _preset(value: str) -> str:
    if value not in PRESETS:
        raise ValueError(f"unknown preset {json.dumps(value)}; valid presets: {', '.join(sorted(PRESETS))}")
    return value


PresetName = Annotated[StrictStr, AfterValidator(_preset)]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"bad name {json.dumps(value)}: use letters, digits, '.', '_' or '-' (it appears in rules and audit events)"
        )
    return value


Name = Annotated[StrictStr, AfterValidator(_name)]

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")


def _host(value: str) -> str:
    """Hosts are matched case-insensitively and without the port."""
    host = value.lower().removesuffix(".")
    if host == "*" or _HOSTNAME.fullmatch(host):
        return host
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
            return host
        except ValueError:
            pass
    if ":" in host and _HOSTNAME.fullmatch(host.rsplit(":", 1)[0]):
        raise ValueError(f"hosts match without the port: write {json.dumps(host.rsplit(':', 1)[0])}")
    raise ValueError(f"bad host {json.dumps(value)}: expected a host name like \"app.example.test\" or \"*.example.test\"")


Host = Annotated[StrictStr, AfterValidator(_host)]


def _path_glob(value: str) -> str:
    if not value.startswith(("/", "*")):
        raise ValueError(f"bad path pattern {json.dumps(value)}: it must start with \"/\" (or \"*\")")
    if "?" in value or "#" in value:
        raise ValueError(
            f"bad path pattern {json.dumps(value)}: patterns match the path without the query string; only \"*\" is special"
        )
    return value


PathGlob = Annotated[StrictStr, AfterValidator(_path_glob)]


def _method(value: str) -> str:
    method = value.upper()
    if not re.fullmatch(r"[A-Z]+", method):
        raise ValueError(f"bad HTTP method {json.dumps(value)}")
    return method


Method = Annotated[StrictStr, AfterValidator(_method)]


def _allow_rule(value: str) -> str:
    if not re.fullmatch(r"(user|group):\S+", value):
        raise ValueError(f"bad allow rule {json.dumps(value)}: expected \"user:NAME\" or \"group:NAME\"")
    return value


AllowRule = Annotated[StrictStr, AfterValidator(_allow_rule)]


def _sink(value: str) -> str:
    if value in ("store", "stdout", "syslog"):
        return value
    if value.startswith("jsonl:") and value[len("jsonl:") :].strip():
        return value
    if value.startswith("syslog:"):
        try:
            parse_syslog_target(value)  # the spelling; the CA file is checked with the config's folder known
        except ValueError as exc:
            raise ValueError(f"bad audit sink {json.dumps(redact_sink(value))}: {exc}") from None
        return value
    raise ValueError(f"bad audit sink {json.dumps(value)}: expected \"store\", \"stdout\", \"syslog\", "
                     f"\"jsonl:PATH\" or {SYSLOG_SPELLING}")


SinkSpec = Annotated[StrictStr, AfterValidator(_sink)]


def parse_listen(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[IPV6]:PORT"`` -> (host, port); ValueError otherwise."""
    bracketed = re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})", text)
    plain = re.fullmatch(r"([A-Za-z0-9.-]+):(\d{1,5})", text)
    if bracketed:
        host, port = bracketed.group(1), int(bracketed.group(2))
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad listen address {json.dumps(text)}: {host!r} is not an IPv6 address") from None
    elif plain:
        host, port = plain.group(1), int(plain.group(2))
    elif text.count(":") > 1:
        raise ValueError(f"bad listen address {json.dumps(text)}: write IPv6 addresses in brackets, e.g. \"[::1]:8080\"")
    else:
        raise ValueError(f"bad listen address {json.dumps(text)}: expected \"HOST:PORT\", e.g. \"127.0.0.1:8080\"")
    if port > 65535:
        raise ValueError(f"bad listen address {json.dumps(text)}: port {port} is above 65535")
    return host, port


def _listen(value: str) -> str:
    parse_listen(value)
    return value


Listen = Annotated[StrictStr, AfterValidator(_listen)]


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {json.dumps(value)}")
    try:
        _ = parts.port  # raises on a bad port
    except ValueError:
        raise ValueError(f"bad port in URL {json.dumps(value)}") from None
    return value


HttpUrl = Annotated[StrictStr, AfterValidator(_http_url)]


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"bad regular expression {json.dumps(value)}: {exc}") from None
    return value


Regex = Annotated[StrictStr, AfterValidator(_regex)]


def postgres_host(name: str) -> str:
    """The host a ``[[postgres]]`` listener's connections are judged under (its policy is an app's).

    ``.invalid`` is reserved (RFC 2606): no browser request can carry it, so no web app can match it.
    """
    return f"{name.lower()}.postgres.lapse.invalid"


def _is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _base_dir(info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    return Path(base) if base is not None else Path.cwd()


def _resolve(base: Path, written: str) -> Path:
    path = Path(written).expanduser()
    if path.is_absolute():
        return path
    return Path(os.path.normpath(base.absolute() / path))


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_COOKIE_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Server(_Section):
    """[server]: where lapse listens, and how it treats the network in front."""

    listen: Listen = "127.0.0.1:8080"
    mode: Literal["forward-auth", "proxy"] = "forward-auth"
    upstream: HttpUrl | None = None
    public_url: HttpUrl = "http://127.0.0.1:8080"  # left out: http:// + listen (wildcards -> loopback)
    trusted_proxies: tuple[Cidr, ...] = (IPv4Network("127.0.0.1/32"), IPv6Network("::1/128"))
    cookie_name: StrictStr = "__Host-lapse"
    insecure_http: StrictBool = False
    secret_file: StrictStr = ".lapse/secret"
    workers: Annotated[StrictInt, Field(ge=1)] = 1
    inject_widget: StrictBool = False

    _secret_path: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _derive_public_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and "public_url" not in data and isinstance(data.get("listen"), str):
            try:
                host, port = parse_listen(data["listen"])
            except ValueError:
                return data  # the listen error is reported on its own
            if host in ("0.0.0.0", ""):
                host = "127.0.0.1"
            elif host == "::":
                host = "::1"
            shown = f"[{host}]" if ":" in host else host
            data = {**data, "public_url": f"http://{shown}:{port}"}
        return data

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Server:
        self._secret_path = _resolve(_base_dir(info), self.secret_file)
        issues = []
        if self.mode == "proxy" and self.upstream is None:
            issues.append((("upstream",), 'mode = "proxy" needs upstream (the URL of the app behind lapse)'))
        if not self.cookie_secure and not self.insecure_http:
            issues.append(
                (
                    ("public_url",),
                    f"plain http on a non-loopback public_url ({self.public_url}) sends session cookies "
                    "unencrypted; use https, or set insecure_http = true to accept that",
                )
            )
        if not _COOKIE_TOKEN.fullmatch(self.cookie_name):
            issues.append((("cookie_name",), f"bad cookie name {json.dumps(self.cookie_name)}"))
        if issues:
            raise _issues(*issues)
        return self

    @property
    def listen_host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return parse_listen(self.listen)[1]

    @property
    def secret_path(self) -> Path:
        """``secret_file`` resolved against the config file's folder."""
        return self._secret_path or _resolve(Path.cwd(), self.secret_file)

    @property
    def cookie_secure(self) -> bool:
        """False only for plain http on a non-loopback public_url (browsers
        treat http://localhost and 127.0.0.1 as secure contexts)."""
        parts = urlsplit(self.public_url)
        return parts.scheme == "https" or _is_loopback_host(parts.hostname)

    @property
    def effective_cookie_name(self) -> str:
        """``__Host-``/``__Secure-`` cookies need Secure: without it, "lapse"."""
        if self.cookie_secure or not self.cookie_name.startswith(("__Host-", "__Secure-")):
            return self.cookie_name
        return "lapse"


class Telemetry(_Section):
    """[telemetry]: Prometheus metrics, on their own listener (off when unset)."""

    metrics_listen: Listen | None = None


class Store(_Section):
    """[store]: where sessions, users and the store audit sink live."""

    url: StrictStr = "sqlite:///.lapse/lapse.db"
    sweep_interval: Duration = 1.0

    _sqlite_path: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Store:
        url = self.url
        problem = None
        if url == "memory://":
            pass
        elif url.startswith("sqlite:///"):
            written = url[len("sqlite:///") :]
            if not written:
                problem = 'sqlite needs a file: "sqlite:///PATH" (relative) or "sqlite:////ABSOLUTE/PATH"'
            else:
                self._sqlite_path = _resolve(_base_dir(info), written)
        elif is_redis_url(url):
            try:
                unreadable = unreadable_files(parse_redis_url(url))
            except ValueError as exc:
                problem = (f'bad redis URL {json.dumps(redact(url))} ({exc}): expected "redis://HOST:PORT/DB", '
                           '"redis+sentinel://HOST:PORT,.../NAME/DB" or "redis+cluster://HOST:PORT,..." (see docs/redis.md)')
            else:
                if unreadable:
                    problem = f"redis URL {json.dumps(redact(url))}: " + "; ".join(unreadable)
        else:
            problem = (
                f'unsupported store URL {json.dumps(redact(url))}: expected "memory://", "sqlite:///PATH" '
                'or "redis://HOST:PORT/DB" ("rediss://" for TLS; redis+sentinel:// and redis+cluster:// too)'
            )
        if problem:
            raise _issues((("url",), problem))
        return self

    @property
    def kind(self) -> Literal["memory", "sqlite", "redis"]:
        if self.url == "memory://":
            return "memory"
        if self.url.startswith("sqlite:"):
            return "sqlite"
        return "redis"

    @property
    def sqlite_path(self) -> Path | None:
        """The database file, resolved against the config file's folder."""
        if self.kind != "sqlite":
            return None
        return self._sqlite_path or _resolve(Path.cwd(), self.url[len("sqlite:///") :])

    @property
    def redis_url(self) -> str | None:
        return self.url if self.kind == "redis" else None


class Audit(_Section):
    """[audit]: where audit events go and how long the store keeps them."""

    sinks: tuple[SinkSpec, ...] = ("store",)
    retention: Duration = 90 * 86400.0

    _parsed: tuple[AuditSink, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Audit:
        issues: list[tuple[tuple[str | int, ...], str]] = []
        parsed = []
        for index, spec in enumerate(self.sinks):
            try:
                parsed.append(_parse_sink(spec, _base_dir(info)))
            except ValueError as exc:  # a remote syslog's ?ca= file
                issues.append((("sinks", index), f"bad audit sink {json.dumps(redact_sink(spec))}: {exc}"))
        if issues:
            raise _issues(*issues)
        self._parsed = tuple(parsed)
        seen: dict[tuple[object, ...], int] = {}
        for index, sink in enumerate(self._parsed):
            t = sink.target
            key = (sink.kind, sink.path) if t is None else (sink.kind, t.transport, t.host.lower(), t.port)
            if key in seen:
                issues.append((("sinks", index), f"the same sink as sinks[{seen[key]}]"))
            seen.setdefault(key, index)
        if issues:
            raise _issues(*issues)
        return self

    @property
    def parsed_sinks(self) -> tuple[AuditSink, ...]:
        """The sinks with jsonl paths resolved against the config file's folder."""
        if len(self._parsed) != len(self.sinks):
            return tuple(_parse_sink(spec, Path.cwd()) for spec in self.sinks)
        return self._parsed


def _parse_sink(spec: str, base: Path) -> AuditSink:
    if spec.startswith("jsonl:"):
        return AuditSink("jsonl", _resolve(base, spec[len("jsonl:") :].strip()), spec)
    if spec.startswith("syslog:"):
        return AuditSink("syslog", None, spec, parse_syslog_target(spec, base))
    return AuditSink(spec, None, spec)  # type: ignore[arg-type]


class Report(_Section):
    """[report]: what ``lapse audit report`` and the admin page call automation (issue 8).

    A session is a suspect when, over at least ``min_samples`` gaps between its
    activity writes, the gaps vary too little (``max_gap_cv``), or its activity
    covers ``min_hours`` hours of the day, or one path made ``one_path_share``
    of it (a lower bound: core.activity).
    """

    window: Duration = 30 * 86400.0  # how far back the report reads the audit log
    min_samples: Annotated[StrictInt, Field(ge=2)] = 20
    max_gap_cv: Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)] = 0.1
    min_hours: Annotated[StrictInt, Field(ge=1, le=24)] = 20
    one_path_share: Annotated[StrictFloat, Field(gt=0, le=1, allow_inf_nan=False)] = 0.95
    top: Annotated[StrictInt, Field(ge=1)] = 10  # rows in "users who time out most"


class Login(_Section):
    """[login]: brute-force throttling, per user and per IP."""

    max_attempts: Annotated[StrictInt, Field(ge=1)] = 5
    window: Duration = 15 * 60.0


class Org(_Section):
    """[org]: the ceiling nothing below may exceed (absent: no ceiling)."""

    max_idle: IdleDuration = None
    max_absolute: Duration | None = None


class _Limits(_Section):
    def explicit(self, key: str) -> bool:
        """Whether the file set ``key`` here (tells ``idle = "none"`` from absent)."""
        return key in self.model_fields_set


class Defaults(_Limits):
    """[defaults]: applies to every app unless the app overrides.

    ``idle``/``absolute``/``warn_before`` are ``None`` when not set here, so the
    preset (then the built-in value) applies; ``idle`` may also be ``None``
    because it was ``"none"``: see :meth:`explicit`.
    """

    preset: PresetName | None = None
    idle: IdleDuration = None
    absolute: Duration | None = None
    warn_before: Duration | None = None
    passive_paths: tuple[PathGlob, ...] = ()
    on_ip_change: OnIpChange = "allow"
    max_sessions: Annotated[StrictInt, Field(ge=0)] = 0  # per user; 0 = unlimited
    websocket_activity: Regex | None = None  # client WebSocket messages that count as activity (None: all)


class Privileged(_Section):
    """[[apps.privileged]]: routes that need a recent (and maybe MFA) sign-in."""

    paths: Annotated[tuple[PathGlob, ...], Field(min_length=1)]
    methods: Annotated[tuple[Method, ...], Field(min_length=1)] | None = None  # None: every method
    max_auth_age: Duration
    mfa: StrictBool = False


class App(_Limits):
    """[[apps]]: one protected application; the first match in file order wins.

    Keys left out are ``None`` (inherit from [defaults]); ``passive_paths`` are
    added to the defaults' list; ``paths``/``allow``/``methods`` ``None`` means
    "all". ``idle`` may be ``None`` because it was ``"none"``: see :meth:`explicit`.
    """

    name: Name
    hosts: Annotated[tuple[Host, ...], Field(min_length=1)]
    paths: Annotated[tuple[PathGlob, ...], Field(min_length=1)] | None = None
    preset: PresetName | None = None
    idle: IdleDuration = None
    absolute: Duration | None = None
    warn_before: Duration | None = None
    passive_paths: tuple[PathGlob, ...] = ()
    on_ip_change: OnIpChange | None = None
    allow: Annotated[tuple[AllowRule, ...], Field(min_length=1)] | None = None
    privileged: tuple[Privileged, ...] = ()
    websocket_activity: Regex | None = None  # None: the defaults' (and there None: every client message)

    @property
    def allowed_users(self) -> frozenset[str]:
        return frozenset(r.split(":", 1)[1] for r in self.allow or () if r.startswith("user:"))

    @property
    def allowed_groups(self) -> frozenset[str]:
        return frozenset(r.split(":", 1)[1] for r in self.allow or () if r.startswith("group:"))


class Postgres(_Limits):
    """[[postgres]]: a PostgreSQL gateway listener; its policy keys work as an app's (docs/connections.md)."""

    name: Name
    listen: Listen
    upstream: Listen  # host:port of the PostgreSQL server
    preset: PresetName | None = None
    idle: IdleDuration = None
    absolute: Duration | None = None
    warn_before: Duration | None = None
    on_ip_change: OnIpChange | None = None
    allow: Annotated[tuple[AllowRule, ...], Field(min_length=1)] | None = None
    tls_cert: StrictStr | None = None  # PEM: the certificate (then its intermediates) clients see
    tls_key: StrictStr | None = None  # PEM: its private key, unencrypted
    tls_required: StrictBool = False  # refuse clients that do not ask for TLS (FATAL 28000, like hostssl)

    _tls_paths: tuple[Path, Path] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Postgres:
        """Both TLS files or neither, and loaded here: a bad pair is a config error, not a failed handshake later."""
        from .postgres.tls import TlsFileError, server_context  # here: lapse.postgres imports this module

        issues: list[tuple[tuple[str | int, ...], str]] = []
        if (self.tls_cert is None) != (self.tls_key is None):
            given, absent = ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            issues.append(((absent,), f"{given} is set, so {absent} is needed too: give both (the certificate "
                                      "and its private key) or neither"))
        elif self.tls_cert is not None and self.tls_key is not None:
            base = _base_dir(info)
            paths = (_resolve(base, self.tls_cert), _resolve(base, self.tls_key))
            try:
                server_context(*paths)
                self._tls_paths = paths
            except TlsFileError as exc:
                issues.append(((exc.key,), exc.message))
        if self.tls_required and (self.tls_cert is None or self.tls_key is None):
            issues.append((("tls_required",), "tls_required = true needs tls_cert and tls_key"))
        for index, rule in enumerate(self.allow or ()):
            if rule.startswith("group:"):  # the session is a PostgreSQL role's: it has no lapse groups to match
                issues.append((("allow", index), f"{rule!r} can never match: a PostgreSQL sign-in carries no groups "
                                                 "(the role is the user); use user:ROLE rules"))
        if issues:
            raise _issues(*issues)
        return self

    @property
    def tls_paths(self) -> tuple[Path, Path] | None:
        """(certificate, key) resolved against the config file's folder; None without TLS."""
        return self._tls_paths

    @property
    def passive_paths(self) -> tuple[str, ...]:
        return ()


class Network(_Section):
    """[[networks]]: scale limits by where the request comes from (first match)."""

    name: Name
    cidrs: Annotated[tuple[Cidr, ...], Field(min_length=1)]
    # At most 1,000: a factor only ever stretches or shortens a limit, and larger ones overflowed the limits they
    # scale (a 1e308 factor made every request from that network a 500).
    idle_factor: Annotated[StrictFloat, Field(gt=0, le=1000, allow_inf_nan=False)] = 1.0
    absolute_factor: Annotated[StrictFloat, Field(gt=0, le=1000, allow_inf_nan=False)] = 1.0


class OIDC(_Section):
    """[oidc]: sign in through an OpenID Connect provider."""

    issuer: HttpUrl
    client_id: Annotated[StrictStr, Field(min_length=1)]
    client_secret: StrictStr | None = None
    client_secret_file: StrictStr | None = None
    scopes: tuple[StrictStr, ...] = ("openid", "profile", "email")
    username_claim: StrictStr = "preferred_username"  # falls back to "sub"
    groups_claim: StrictStr = "groups"
    admin_groups: tuple[StrictStr, ...] = ()
    require_logout_typ: StrictBool = False
    revalidate_every: IdleDuration = None

    _secret_path: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> OIDC:
        issues = []
        parts = urlsplit(self.issuer)
        if parts.scheme != "https" and not _is_loopback_host(parts.hostname):
            issues.append((("issuer",), "the issuer must use https (plain http only on loopback, for testing)"))
        if (self.client_secret is None) == (self.client_secret_file is None):
            issues.append(((), "give exactly one of client_secret and client_secret_file"))
        if "openid" not in self.scopes:
            issues.append((("scopes",), 'scopes must include "openid"'))
        if self.client_secret_file is not None:
            self._secret_path = _resolve(_base_dir(info), self.client_secret_file)
        if issues:
            raise _issues(*issues)
        return self

    @property
    def client_secret_path(self) -> Path | None:
        if self.client_secret_file is None:
            return None
        return self._secret_path or _resolve(Path.cwd(), self.client_secret_file)


_SECTIONS = ("server", "telemetry", "store", "audit", "report", "login", "org", "defaults")


class Config(_Section):
    """The whole lapse.toml. Every section is present; ``oidc`` may be None."""

    server: Server = Field(default_factory=Server)
    telemetry: Telemetry = Field(default_factory=Telemetry)
    store: Store = Field(default_factory=Store)
    audit: Audit = Field(default_factory=Audit)
    report: Report = Field(default_factory=Report)
    login: Login = Field(default_factory=Login)
    org: Org = Field(default_factory=Org)
    defaults: Defaults = Field(default_factory=Defaults)
    apps: tuple[App, ...] = ()
    networks: tuple[Network, ...] = ()
    postgres: tuple[Postgres, ...] = ()
    oidc: OIDC | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_sections(cls, data: Any) -> Any:
        # Validate absent sections too, so their relative paths resolve against
        # the config file's folder (the context), not the current directory.
        if isinstance(data, dict):
            data = {**{name: {} for name in _SECTIONS}, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> Config:
        issues: list[tuple[tuple[str | int, ...], str]] = []
        for kind, items in (("apps", self.apps), ("networks", self.networks)):
            first: dict[str, int] = {}
            for index, item in enumerate(items):
                if item.name in first:
                    issues.append(
                        ((kind, index, "name"), f"duplicate name {json.dumps(item.name)} (also {kind}[{first[item.name]}])")
                    )
                first.setdefault(item.name, index)
        apps = {app.name: index for index, app in enumerate(self.apps)}
        for index, pg in enumerate(self.postgres):
            if pg.name in apps:
                issues.append((("postgres", index, "name"),
                               f"name {json.dumps(pg.name)} is also an app's (apps[{apps[pg.name]}]): names are shared"))
            for other, listen in ((("server", "listen"), self.server.listen),
                                  *((("postgres", i, "listen"), p.listen) for i, p in enumerate(self.postgres[:index]))):
                if listen == pg.listen:
                    issues.append((("postgres", index, "listen"), f"{pg.listen} is also {_dotted(other)}"))
        if self.server.workers > 1 and self.store.kind == "memory":
            issues.append(
                (
                    ("server", "workers"),
                    f"workers = {self.server.workers} needs a shared store; memory:// is private to one process",
                )
            )
        if self.telemetry.metrics_listen is not None and self.telemetry.metrics_listen == self.server.listen:
            issues.append(
                (("telemetry", "metrics_listen"), "metrics need their own listener, not server.listen")
            )
        if issues:
            raise _issues(*issues)
        return self


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_config(path: str | Path | None) -> LoadedConfig:
    """Load ``path`` (``None``: the built-in defaults, paths relative to the cwd)."""
    if path is None:
        return parse_config("", source=BUILTIN_SOURCE, base_dir=Path.cwd())
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([Problem("", None, f"cannot read the config file: {exc.strerror or exc}")], source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([Problem("", line, "the config file is not valid UTF-8")], source) from None
    return parse_config(text, source=source, base_dir=Path(os.path.abspath(path)).parent)


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> LoadedConfig:
    """Validate TOML text; raise :class:`ConfigError` listing every problem."""
    base = Path(base_dir).absolute() if base_dir is not None else Path.cwd()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_problem(exc, text)], source) from None
    locations = locate(text)
    try:
        config = Config.model_validate(data, context={"base_dir": base})
    except ValidationError as exc:
        raise ConfigError(_problems(exc, locations), source) from None
    return LoadedConfig(config, _warnings(config, locations), source, base, locations)


def _syntax_problem(exc: tomllib.TOMLDecodeError, text: str) -> Problem:
    message = str(exc)
    line: int | None = None
    match = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if match:
        line = int(match.group(1))
        message = f"{message[: match.start()]} (column {match.group(2)})"
    elif message.endswith("(at end of document)"):
        line = text.count("\n") + 1
        message = message[: -len("(at end of document)")].rstrip() + " (at end of document)"
    return Problem("", line, f"TOML syntax error: {message}")


_TYPE_MESSAGES = {
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "dict_type": "expected a table",
    "tuple_type": "expected an array",
    "list_type": "expected an array",
}


def _problems(exc: ValidationError, locations: dict[str, int]) -> list[Problem]:
    problems: list[Problem] = []
    errors = exc.errors(include_url=False)
    failed = [tuple(e["loc"]) for e in errors]
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "too_short" and any(len(f) > len(loc) and f[: len(loc)] == loc for f in failed):
            continue  # "empty" only because its items failed; those errors say why
        if error["type"] == "lapse_issues":
            for sub, message in error["ctx"]["issues"]:
                path = format_path(loc + tuple(sub))
                problems.append(Problem(path, line_of(locations, path), message))
            continue
        path = format_path(loc)
        problems.append(Problem(path, line_of(locations, path), _message(error, loc)))
    return sorted(problems, key=lambda p: (p.line is None, p.line or 0))


def _message(error: Any, loc: tuple[Any, ...]) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "extra_forbidden":
        message = "unknown table" if isinstance(value, dict) else "unknown key"
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        return f"{message} (did you mean {json.dumps(close[0])}?)" if close else message
    if kind == "missing":
        return "required key is missing"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace("'", '"')
        return f"must be {expected}, got {_describe(value)}"
    if kind in _TYPE_MESSAGES:
        return f"{_TYPE_MESSAGES[kind]}, got {_describe(value)}"
    if kind == "too_short" and ctx.get("min_length") == 1:
        return "must not be empty (leave the key out instead)" if loc and loc[-1] in ("paths", "methods", "allow") else "must not be empty"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt'):g}, got {_describe(value)}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge'):g}, got {_describe(value)}"
    if kind == "finite_number":
        return "must be a finite number"
    return str(error.get("msg", "invalid value"))


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the model at ``loc`` accepts, to suggest a fix for a typo."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part) if isinstance(model, type) else None
        if info is None:
            return []
        model = _model_in(info.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, tuple, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _more_generous(value: float | None, than: float | None) -> bool:
    """``None`` is "no limit", the most generous of all."""
    if than is None:
        return False
    return value is None or value > than


def _network_warnings(config: Config, warn: Callable[[str, str], None]) -> None:
    """A network factor that lifts an app past its preset: allowed, but worth a word.

    Asks the compiled policy, so the numbers are those enforcement will use.
    """
    policy = build_policy(config)
    for ai, app in enumerate(config.apps):
        preset_name = app.preset or config.defaults.preset
        if preset_name is None:
            continue
        preset = PRESETS[preset_name]
        for ni, network in enumerate(config.networks):
            limits = policy.limits_of(ai, ni)
            for key, value, preset_value in (("idle", limits.idle, preset.idle), ("absolute", limits.absolute, preset.absolute)):
                if _more_generous(value, preset_value):
                    warn(
                        f"networks[{ni}]",
                        f"network {network.name} gives app {app.name} {key} {format_duration(value)}, more generous "
                        f"than preset {preset_name} ({key} {format_duration(preset_value)})",
                    )


def _order_warnings(config: Config, warn: Callable[[str, str], None]) -> None:
    """The first app in file order wins (CONTRACT §2): a later app whose host an earlier one claims for every
    path is never chosen there (a wildcard listed before an exact host, say); and a warning that would
    open the moment a page loads (``warn_before`` not shorter than the idle limit)."""
    for j, later in enumerate(config.apps):
        for host in (normalize_host(h) for h in later.hosts):
            for earlier in config.apps[:j]:
                if earlier.paths or not any(_claims(normalize_host(h), host) for h in earlier.hosts):
                    continue
                warn(f"apps[{j}].hosts", f"app {later.name} is never chosen for {host}: app {earlier.name} comes "
                     "first in the file and claims it for every path; list the more specific app first")
                break
    policy = build_policy(config)
    for index, name in [(None, "defaults"), *((i, f"apps[{i}]") for i in range(len(config.apps)))]:
        limits = policy.limits_of(index, None)
        if limits.idle is not None and limits.warn_before >= limits.idle:
            warn(name, f"warn_before {format_duration(limits.warn_before)} is not shorter than idle "
                 f"{format_duration(limits.idle)}: the countdown would open as soon as a page loads")


def _claims(pattern: str, host: str) -> bool:
    """Whether a host pattern (exact, or ``*.example.test``) matches every request ``host`` matches."""
    if pattern == host:
        return True
    return "*" in pattern and "*" not in host and fnmatch.fnmatchcase(host, pattern)


def _warnings(config: Config, locations: dict[str, int]) -> list[Problem]:
    warnings: list[Problem] = []

    def warn(path: str, message: str) -> None:
        warnings.append(Problem(path, line_of(locations, path), message))

    tables: list[tuple[str, Defaults | App, str | None]] = [("defaults", config.defaults, config.defaults.preset)]
    for index, app in enumerate(config.apps):
        tables.append((f"apps[{index}]", app, app.preset or config.defaults.preset))
    ceilings = {"idle": ("org.max_idle", config.org.max_idle), "absolute": ("org.max_absolute", config.org.max_absolute)}
    for where, table, preset_name in tables:
        for key in ("idle", "absolute"):
            if not table.explicit(key):
                continue
            value = getattr(table, key)
            if preset_name is not None:
                preset_value = getattr(PRESETS[preset_name], key)
                if _more_generous(value, preset_value):
                    warn(
                        f"{where}.{key}",
                        f"{format_duration(value)} is more generous than preset {preset_name} "
                        f"({key} {format_duration(preset_value)}); allowed, but the preset's source asks for no more",
                    )
            ceiling_name, ceiling = ceilings[key]
            if _more_generous(value, ceiling):
                warn(
                    f"{where}.{key}",
                    f"{format_duration(value)} is above the org ceiling {ceiling_name} = "
                    f"{format_duration(ceiling)}; it will be capped to {format_duration(ceiling)}",
                )
    _network_warnings(config, warn)
    _order_warnings(config, warn)
    if config.server.insecure_http:
        if config.server.cookie_secure:
            message = "insecure_http = true has no effect: public_url is https or loopback"
        else:
            message = (
                "insecure_http = true: session cookies travel over plain http without the Secure flag "
                f"(cookie \"{config.server.effective_cookie_name}\"); use only behind TLS you control, or for testing"
            )
        warn("server.insecure_http", message)
    for index, pg in enumerate(config.postgres):
        if pg.tls_paths is not None:
            from .postgres.tls import tls_warnings

            for key, message in tls_warnings(*pg.tls_paths):
                warn(f"postgres[{index}].{key}", message)
    return sorted(warnings, key=lambda p: (p.line is None, p.line or 0))


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _layer(section: Defaults | App | Postgres) -> Layer:
    """The keys a section sets itself (``idle = "none"`` is set; a missing key is not)."""
    settings = {k: getattr(section, k) for k in ("idle", "absolute", "warn_before") if section.explicit(k)}
    return Layer(settings, section.preset, tuple(section.passive_paths), section.on_ip_change)


def build_policy(config: Config) -> Policy:
    """The compiled core policy: built once per load, then only ``resolve`` runs per request."""
    apps = tuple(
        AppSpec(
            name=app.name,
            hosts=tuple(app.hosts),
            layer=_layer(app),
            paths=tuple(app.paths or ()),
            privileged=tuple(
                PrivilegedSpec(tuple(p.paths), p.max_auth_age, p.mfa, frozenset(p.methods) if p.methods else None)
                for p in app.privileged
            ),
            allow=tuple(app.allow) if app.allow is not None else None,
        )
        for app in config.apps
    ) + tuple(
        AppSpec(name=pg.name, hosts=(postgres_host(pg.name),), layer=_layer(pg), paths=(), privileged=(),
                allow=tuple(pg.allow) if pg.allow is not None else None)
        for pg in config.postgres
    )
    networks = tuple(
        NetworkSpec(n.name, tuple(n.cidrs), n.idle_factor, n.absolute_factor) for n in config.networks
    )
    return compile_policy(
        PolicySpec(_layer(config.defaults), apps, networks, config.org.max_idle, config.org.max_absolute,
                   config.defaults.max_sessions)
    )
