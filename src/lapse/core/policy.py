"""The policy model and its matcher: one request in, its effective limits out.

Resolution (CONTRACT.md §2), per key, most specific first: the app's explicit
key, the app's preset, the defaults' explicit key, the defaults' preset, the
built-in default; then the network factor; then the org ceiling caps last.

Everything that does not depend on the request is worked out once, in
``compile_policy``: the limits of every (app, network) pair, with the rules that
produced them, and the most generous limits any app could grant (which decide
when a session as a whole is over). Per request, ``Policy.resolve`` only finds
the app (host, then path), the network (first CIDR match), whether the request
is passive and whether its route is privileged. ``lapse policy explain`` calls
the same ``resolve``: there is no second copy of these rules.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .durations import format_duration
from .presets import PRESETS

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BUILTIN: Mapping[str, float | None] = {"idle": 30 * 60.0, "absolute": 12 * 3600.0, "warn_before": 120.0}
"""Built-in defaults when nothing else sets a key (CONTRACT §2)."""

LIMIT_KEYS = ("idle", "absolute", "warn_before")
ON_IP_CHANGE = ("allow", "step_up", "revoke")

LAPSE_STATUS = (("GET", "/_lapse/session"), ("GET", "/_lapse/events"), ("HEAD", "/_lapse/session"))
"""lapse's own status endpoints: always passive, whatever the app says."""

PASSIVE_HEADER = "x-lapse-activity"


# --------------------------------------------------------------------------- spec
# What the configuration says, as plain data. ``lapse.config`` builds these.


@dataclass(frozen=True, slots=True)
class PrivilegedSpec:
    paths: tuple[str, ...]
    max_auth_age: float
    mfa: bool = False
    methods: frozenset[str] | None = None  # None: every method


@dataclass(frozen=True, slots=True)
class Layer:
    """Defaults or one app: the keys it sets explicitly (absent = not set)."""

    settings: Mapping[str, float | None] = field(default_factory=dict)
    preset: str | None = None
    passive_paths: tuple[str, ...] = ()
    on_ip_change: str | None = None


@dataclass(frozen=True, slots=True)
class AppSpec:
    name: str
    hosts: tuple[str, ...]
    layer: Layer = Layer()
    paths: tuple[str, ...] = ()  # empty: every path of its hosts
    privileged: tuple[PrivilegedSpec, ...] = ()
    allow: tuple[str, ...] | None = None  # "user:NAME" / "group:NAME"; None: everyone


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    name: str
    cidrs: tuple[IpNetwork, ...]
    idle_factor: float = 1.0
    absolute_factor: float = 1.0


@dataclass(frozen=True, slots=True)
class PolicySpec:
    defaults: Layer = Layer()
    apps: tuple[AppSpec, ...] = ()
    networks: tuple[NetworkSpec, ...] = ()
    max_idle: float | None = None  # org ceiling; None: no ceiling
    max_absolute: float | None = None
    max_sessions: int = 0  # per user; 0: unlimited


# ---------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits of one (app, network) pair, fixed at compile time."""

    app: str | None
    network: str | None
    idle: float | None  # None: no idle limit
    absolute: float
    warn_before: float
    sources: Mapping[str, str]  # key -> the rule it came from
    rules: tuple[str, ...]
    on_ip_change: str
    allow_users: frozenset[str] | None
    allow_groups: frozenset[str] | None
    generous_idle: float  # math.inf when some app has no idle limit
    generous_absolute: float


@dataclass(frozen=True, slots=True)
class StepUp:
    max_auth_age: float
    mfa: bool
    rule: str


@dataclass(frozen=True, slots=True)
class Effective:
    """One request's effective policy: what ``decide()`` judges it by."""

    limits: Limits
    active: bool
    activity_rule: str | None
    step_up: StepUp | None

    @property
    def rules(self) -> tuple[str, ...]:
        extra = tuple(r for r in (self.activity_rule, self.step_up and self.step_up.rule) if r)
        return self.limits.rules + extra


# ---------------------------------------------------------------------- matcher


def glob_regex(patterns: Sequence[str]) -> re.Pattern[str] | None:
    """One regex for a list of path globs: ``*`` matches any run, ``/`` included."""
    if not patterns:
        return None
    parts = (".*".join(re.escape(piece) for piece in p.split("*")) for p in patterns)
    return re.compile("(?:" + "|".join(parts) + r")\Z", re.DOTALL)


def normalize_host(host: str) -> str:
    """Lower-case, without port or trailing dot: ``Billing.Example.TEST:443`` -> ``billing.example.test``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _network_rule(net: NetworkSpec) -> str:
    """``network:office x2`` (idle factor), with ``absolute xN`` after it when that is scaled too."""
    factors = [f"x{net.idle_factor:g}"] if net.idle_factor != 1 else []
    if net.absolute_factor != 1:
        factors.append(f"absolute x{net.absolute_factor:g}")
    return " ".join([f"network:{net.name}", ", ".join(factors)]).strip()


@dataclass(frozen=True, slots=True)
class _App:
    index: int
    name: str
    path_re: re.Pattern[str] | None
    passive: tuple[tuple[str, re.Pattern[str]], ...]
    privileged: tuple[tuple[re.Pattern[str], frozenset[str] | None, StepUp], ...]


_CACHE_MAX = 4096
_RESOLVED_MAX = 16_384  # (host, path, method, IP, passive) answers: ~5 MB when full


class Policy:
    """A compiled policy. Immutable once built; ``resolve`` is the hot path."""

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        default_passive = spec.defaults.passive_paths
        self._apps = tuple(
            _App(
                index=i,
                name=a.name,
                path_re=glob_regex(a.paths),
                passive=_passive(default_passive + a.layer.passive_paths),
                privileged=tuple(
                    (
                        glob_regex(p.paths),  # type: ignore[misc]
                        p.methods,
                        StepUp(p.max_auth_age, p.mfa, _privileged_rule(p)),
                    )
                    for p in a.privileged
                    if p.paths
                ),
            )
            for i, a in enumerate(spec.apps)
        )
        self._default_passive = _passive(default_passive)
        self._exact: dict[str, list[int]] = {}
        self._wild: list[tuple[int, re.Pattern[str]]] = []
        for i, a in enumerate(spec.apps):
            for h in a.hosts:
                h = normalize_host(h)
                if "*" in h:
                    self._wild.append((i, re.compile(".*".join(map(re.escape, h.split("*"))) + r"\Z")))
                else:
                    self._exact.setdefault(h, []).append(i)
        self._host_cache: dict[str, tuple[_App, ...]] = {}
        self._net_cache: dict[str, int] = {}
        self._resolved: dict[tuple[str, str, str, str | None, bool], Effective] = {}

        combos: dict[tuple[int, int], dict] = {}
        for ai in range(-1, len(spec.apps)):
            for ni in range(-1, len(spec.networks)):
                combos[(ai, ni)] = self._combine(ai, ni)
        self.generous_idle = max(math.inf if c["idle"] is None else c["idle"] for c in combos.values())
        self.generous_absolute = max(c["absolute"] for c in combos.values())
        self._limits = {
            k: Limits(generous_idle=self.generous_idle, generous_absolute=self.generous_absolute, **c)
            for k, c in combos.items()
        }

    # -- compile time -------------------------------------------------------

    def _combine(self, ai: int, ni: int) -> dict:
        """Resolve every key for one (app, network) pair, recording each step."""
        spec = self.spec
        app = spec.apps[ai] if ai >= 0 else None
        rules: list[str] = []
        if app is not None:
            rules.append(f"app:{app.name}")
        layers: list[tuple[str, Mapping[str, float | None]]] = []
        if app is not None:
            layers.append((f"app:{app.name}", app.layer.settings))
            if app.layer.preset:
                layers.append((f"preset:{app.layer.preset}", _preset_settings(app.layer.preset)))
        layers.append(("defaults", spec.defaults.settings))
        if spec.defaults.preset:
            layers.append((f"preset:{spec.defaults.preset}", _preset_settings(spec.defaults.preset)))
        layers.append(("built-in", BUILTIN))

        values: dict[str, float | None] = {}
        sources: dict[str, str] = {}
        for key in LIMIT_KEYS:
            for name, settings in layers:
                if key in settings:
                    values[key], sources[key] = settings[key], name
                    break
        for name, _ in layers:
            if name in sources.values() and name not in rules:
                rules.append(name)

        idle, absolute, warn = values["idle"], values["absolute"], values["warn_before"]
        assert absolute is not None and warn is not None  # the config rejects "none" for these
        net = spec.networks[ni] if ni >= 0 else None
        if net is not None:
            rules.append(_network_rule(net))
            idle = None if idle is None else idle * net.idle_factor
            absolute = absolute * net.absolute_factor
        if spec.max_idle is not None and (idle is None or idle > spec.max_idle):
            idle = spec.max_idle
            rules.append("org.max_idle")
            sources["idle"] = "org.max_idle"
        if spec.max_absolute is not None and absolute > spec.max_absolute:
            absolute = spec.max_absolute
            rules.append("org.max_absolute")
            sources["absolute"] = "org.max_absolute"

        on_ip = (app and app.layer.on_ip_change) or spec.defaults.on_ip_change or "allow"
        allow = app.allow if app is not None else None
        return {
            "app": app.name if app else None,
            "network": net.name if net else None,
            "idle": idle,
            "absolute": absolute,
            "warn_before": warn,
            "sources": sources,
            "rules": tuple(rules),
            "on_ip_change": on_ip,
            "allow_users": None if allow is None else frozenset(a[5:] for a in allow if a.startswith("user:")),
            "allow_groups": None if allow is None else frozenset(a[6:] for a in allow if a.startswith("group:")),
        }

    def limits_of(self, app: int | None, network: int | None) -> Limits:
        """The limits of one (app, network) pair by index in the spec; None: no app / no network."""
        return self._limits[(-1 if app is None else app, -1 if network is None else network)]

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Each app's limits (no network factor), and ``(defaults)``'s: what a policy change is audited by."""
        out = {}
        for i, name in [(None, "(defaults)"), *((i, a.name) for i, a in enumerate(self.spec.apps))]:
            lim = self.limits_of(i, None)
            out[name] = {"idle_s": lim.idle, "absolute_s": lim.absolute, "warn_before_s": lim.warn_before}
        return out

    # -- per request --------------------------------------------------------

    def resolve(
        self,
        host: str,
        path: str,
        method: str = "GET",
        ip: str | None = None,
        passive_header: bool = False,
    ) -> Effective:
        """The effective policy for one request (the path without its query string).

        Answers are remembered (a bounded table, forgotten at once when full): a
        repeated request gets the very same ``Effective`` object, which lets
        callers recognise it by identity.
        """
        facts = (host, path, method, ip, passive_header)
        found = self._resolved.get(facts)
        if found is None:
            found = self._resolve(host, path, method, ip, passive_header)
            if len(self._resolved) >= _RESOLVED_MAX:
                self._resolved.clear()
            self._resolved[facts] = found
        return found

    def _resolve(self, host: str, path: str, method: str, ip: str | None, passive_header: bool) -> Effective:
        app = self._match_app(host, path)
        ni = self._match_network(ip) if ip else -1
        limits = self._limits[(app.index if app else -1, ni)]

        activity_rule: str | None = None
        if passive_header:
            activity_rule = "passive:header"
        elif (method, path) in LAPSE_STATUS:
            activity_rule = "passive:lapse-status"
        else:
            for glob, rx in app.passive if app else self._default_passive:
                if rx.match(path):
                    activity_rule = f"passive:{glob}"
                    break

        step_up = None
        if app is not None:
            for rx, methods, su in app.privileged:
                if (methods is None or method in methods) and rx.match(path):
                    step_up = su
                    break
        return Effective(limits, activity_rule is None, activity_rule, step_up)

    def claims_host(self, host: str) -> bool:
        """Does any app name this host (exactly or by a wildcard)?"""
        return bool(self._candidates(host))

    def _match_app(self, host: str, path: str) -> _App | None:
        for app in self._candidates(host):
            if app.path_re is None or app.path_re.match(path):
                return app
        return None

    def _candidates(self, host: str) -> tuple[_App, ...]:
        candidates = self._host_cache.get(host)
        if candidates is None:
            h = normalize_host(host)
            idx = set(self._exact.get(h, ()))
            idx.update(i for i, rx in self._wild if rx.match(h))
            candidates = tuple(self._apps[i] for i in sorted(idx))
            if len(self._host_cache) >= _CACHE_MAX:
                self._host_cache.clear()
            self._host_cache[host] = candidates
        return candidates

    def _match_network(self, ip: str) -> int:
        ni = self._net_cache.get(ip)
        if ni is None:
            ni = -1
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                addr = None
            if addr is not None:
                if addr.version == 6 and addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped
                for i, net in enumerate(self.spec.networks):
                    if any(addr in c for c in net.cidrs if c.version == addr.version):
                        ni = i
                        break
            if len(self._net_cache) >= _CACHE_MAX:
                self._net_cache.clear()
            self._net_cache[ip] = ni
        return ni


def _passive(globs: Sequence[str]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """Each passive glob with its regex, kept apart so explain can name the one that matched."""
    return tuple((g, glob_regex([g])) for g in dict.fromkeys(globs))  # type: ignore[misc]


def _preset_settings(name: str) -> Mapping[str, float | None]:
    p = PRESETS[name]
    return {"idle": p.idle, "absolute": p.absolute}


def _privileged_rule(p: PrivilegedSpec) -> str:
    methods = "" if p.methods is None else " " + ",".join(sorted(p.methods))
    mfa = ", mfa" if p.mfa else ""
    return f"step-up:{' '.join(p.paths)}{methods} (max_auth_age {format_duration(p.max_auth_age)}{mfa})"


def compile_policy(spec: PolicySpec) -> Policy:
    """Compile once at load; every request then only pays for ``resolve``."""
    return Policy(spec)
