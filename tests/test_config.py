"""lapse.toml validation: every mistake named by dotted path and line, all at once."""

from __future__ import annotations

import re
import textwrap
from ipaddress import ip_network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lapse.config import (
    BUILTIN_SOURCE,
    ConfigError,
    LoadedConfig,
    Problem,
    load_config,
    parse_config,
    parse_listen,
)
from lapse.core.durations import format_duration, parse_duration
from lapse.core.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lapse.toml"


def problems_of(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        parse_config(textwrap.dedent(text), source="lapse.toml")
    return caught.value.problems


def only_problem(text: str) -> Problem:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


# -- the example and the defaults -------------------------------------------


def test_the_example_config_is_valid_without_warnings() -> None:
    loaded = load_config(EXAMPLE)
    assert isinstance(loaded, LoadedConfig)
    assert loaded.warnings == []
    cfg = loaded.config
    assert [a.name for a in cfg.apps] == ["billing", "wiki", "admin"]
    billing, wiki, admin = cfg.apps
    assert billing.preset == "pci-dss-4" and billing.idle == 600.0 and billing.absolute is None
    assert billing.allowed_groups == {"finance"}
    assert billing.privileged[0].methods == ("POST", "DELETE")
    assert billing.privileged[0].max_auth_age == 300.0 and billing.privileged[0].mfa
    assert wiki.idle == 3600.0 and wiki.absolute == 12 * 3600.0 and wiki.preset is None
    assert admin.on_ip_change == "step_up" and admin.privileged[0].mfa
    assert [n.name for n in cfg.networks] == ["office", "elsewhere"]
    assert cfg.networks[0].idle_factor == 1.5 and cfg.networks[1].idle_factor == 0.5
    assert ip_network("10.0.0.0/8") in cfg.networks[0].cidrs
    assert cfg.org.max_idle == 3600.0 and cfg.org.max_absolute == 86400.0
    assert cfg.defaults.preset == "nist-63b4-aal2" and not cfg.defaults.explicit("idle")
    # relative paths are relative to the config file's folder
    assert cfg.store.kind == "sqlite"
    assert cfg.store.sqlite_path == EXAMPLE.parent / ".lapse" / "lapse.db"
    assert cfg.server.secret_path == EXAMPLE.parent / ".lapse" / "secret"
    assert [(s.kind, s.path) for s in cfg.audit.parsed_sinks] == [
        ("store", None),
        ("jsonl", EXAMPLE.parent / ".lapse" / "audit.jsonl"),
    ]


def test_built_in_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = load_config(None)
    cfg = loaded.config
    assert loaded.source == BUILTIN_SOURCE and loaded.warnings == []
    assert cfg.server.listen == "127.0.0.1:8080" and cfg.server.mode == "forward-auth"
    assert cfg.server.cookie_name == "__Host-lapse" and cfg.server.workers == 1
    assert cfg.server.trusted_proxies == (ip_network("127.0.0.1/32"), ip_network("::1/128"))
    assert cfg.server.secret_path == tmp_path / ".lapse" / "secret"
    assert cfg.store.sqlite_path == tmp_path / ".lapse" / "lapse.db"
    assert cfg.store.sweep_interval == 1.0
    assert cfg.login.max_attempts == 5 and cfg.login.window == 900.0
    assert cfg.audit.retention == 90 * 86400.0
    assert cfg.org.max_idle is None and cfg.org.max_absolute is None
    assert cfg.defaults.idle is None and cfg.defaults.on_ip_change == "allow"
    assert cfg.apps == () and cfg.networks == () and cfg.oidc is None


def test_missing_sections_still_resolve_paths_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "lapse.toml"
    path.parent.mkdir()
    path.write_text('[login]\nmax_attempts = 3\n')
    cfg = load_config(path).config
    assert cfg.server.secret_path == path.parent / ".lapse" / "secret"
    assert cfg.store.sqlite_path == path.parent / ".lapse" / "lapse.db"


def test_absolute_and_other_store_urls(tmp_path: Path) -> None:
    cfg = parse_config(f'[store]\nurl = "sqlite:///{tmp_path}/x.db"\n', base_dir=Path("/elsewhere")).config
    assert cfg.store.sqlite_path == tmp_path / "x.db"
    assert parse_config('[store]\nurl = "memory://"\n').config.store.kind == "memory"
    redis = parse_config('[store]\nurl = "rediss://cache.internal:6380/2"\n').config.store
    assert redis.kind == "redis" and redis.redis_url == "rediss://cache.internal:6380/2" and redis.sqlite_path is None


def test_idle_none_is_explicit_and_told_apart_from_absent() -> None:
    cfg = parse_config('[defaults]\nidle = "none"\n[org]\nmax_idle = "none"\n').config
    assert cfg.defaults.idle is None and cfg.defaults.explicit("idle")
    assert cfg.org.max_idle is None


def test_normalisation() -> None:
    cfg = parse_config(
        """
        [[apps]]
        name = "x"
        hosts = ["App.Example.TEST", "*.Example.test."]
          [[apps.privileged]]
          paths = ["/admin/*"]
          methods = ["post", "Delete"]
          max_auth_age = "1h30m"
        [server]
        listen = "[::1]:9000"
        """.replace("\n        ", "\n")
    ).config
    assert cfg.apps[0].hosts == ("app.example.test", "*.example.test")
    assert cfg.apps[0].privileged[0].methods == ("POST", "DELETE")
    assert cfg.apps[0].privileged[0].max_auth_age == 5400.0
    assert (cfg.server.listen_host, cfg.server.listen_port) == ("::1", 9000)
    assert cfg.server.public_url == "http://[::1]:9000"  # derived from listen when left out


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_listen("localhost:8080") == ("localhost", 8080)
    for bad in ("8080", "::1:80", "[zz]:80", "host:99999", "host:", ":80"):
        with pytest.raises(ValueError):
            parse_listen(bad)


# -- errors: right path, right line ------------------------------------------

TWO_APPS = """\
[defaults]
idle = "30m"

[[apps]]
name = "billing"
hosts = ["billing.example.test"]

[[apps]]
name = "wiki"
hosts = ["wiki.example.test"]
idel = "1h"
"""


def test_a_typo_in_the_second_app_names_its_path_and_line() -> None:
    problem = only_problem(TWO_APPS)
    assert problem.path == "apps[1].idel"
    assert problem.line == 11
    assert problem.message.startswith("unknown key")
    assert 'did you mean "idle"' in problem.message


def test_the_error_text_is_file_line_path_message() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(TWO_APPS, source="lapse.toml")
    assert str(caught.value).startswith("lapse.toml:11: apps[1].idel: unknown key")
    assert "pydantic" not in str(caught.value) and "validation error" not in str(caught.value)


# (toml, path, line, a piece of the message)
ERROR_CASES = [
    ('[server]\nlisten = "8080"\n', "server.listen", 2, "HOST:PORT"),
    ('[server]\nlisten = "::1:8080"\n', "server.listen", 2, "[::1]:8080"),
    ('[server]\nmode = "sidecar"\n', "server.mode", 2, '"forward-auth" or "proxy"'),
    ('[server]\nmode = "proxy"\n', "server.upstream", 1, "needs upstream"),
    ('[server]\nupstream = "ftp://x"\n', "server.upstream", 2, "http"),
    ('[server]\n\npublic_url = "http://lapse.example.test"\n', "server.public_url", 3, "insecure_http"),
    ('[server]\ntrusted_proxies = ["127.0.0.1/32", "10.0.0.1/8"]\n', "server.trusted_proxies[1]", 2, "10.0.0.0/8"),
    ('[server]\ntrusted_proxies = [\n  "127.0.0.1/32",\n  "nonsense",\n]\n', "server.trusted_proxies[1]", 4, "CIDR"),
    ('[server]\nworkers = 0\n', "server.workers", 2, "at least 1"),
    ('[server]\nworkers = 2\n[store]\nurl = "memory://"\n', "server.workers", 2, "shared store"),
    ('[server]\ninsecure_http = "yes"\n', "server.insecure_http", 2, "true or false"),
    ('[server]\ncookie_name = "a b"\n', "server.cookie_name", 2, "cookie name"),
    ('[telemetry]\nmetrics_listen = "127.0.0.1:8080"\n', "telemetry.metrics_listen", 2, "own listener"),
    ('[store]\nurl = "postgres://db/lapse"\n', "store.url", 2, "memory://"),
    ('[store]\nurl = "sqlite:///"\n', "store.url", 2, "sqlite"),
    ('[store]\nurl = "redis://:6379/x"\n', "store.url", 2, "redis"),
    ('[store]\nurl = "rediss://h/0?ssl_certfile=/nonexistent/client.pem"\n', "store.url", 2,
     "ssl_certfile=/nonexistent/client.pem: no such file"),
    ('[store]\nsweep_interval = 1\n', "store.sweep_interval", 2, "duration"),
    ('[audit]\nsinks = ["store", "kafka"]\n', "audit.sinks[1]", 2, "jsonl:PATH"),
    ('[audit]\nsinks = ["store", "store"]\n', "audit.sinks[1]", 2, "same sink"),
    ('[audit]\nretention = "none"\n', "audit.retention", 2, '"none" is not allowed'),
    ('[login]\nmax_attempts = 0\n', "login.max_attempts", 2, "at least 1"),
    ('[login]\nwindow = "-5m"\n', "login.window", 2, "bad duration"),
    ('[org]\nmax_absolute = "none"\n', "org.max_absolute", 2, '"none" is not allowed'),
    ('[defaults]\npreset = "nist"\n', "defaults.preset", 2, "pci-dss-4"),
    ('[defaults]\nidle = "0s"\n', "defaults.idle", 2, "greater than zero"),
    ('[defaults]\nidle = 900\n', "defaults.idle", 2, "duration"),
    ('[defaults]\nwarn_before = "none"\n', "defaults.warn_before", 2, '"none" is not allowed'),
    ('[defaults]\non_ip_change = "ignore"\n', "defaults.on_ip_change", 2, '"step_up"'),
    ('[defaults]\nmax_sessions = -1\n', "defaults.max_sessions", 2, "at least 0"),
    ('[defaults]\npassive_paths = ["health"]\n', "defaults.passive_paths[0]", 2, 'start with "/"'),
    ('[[apps]]\nname = "a"\nhosts = []\n', "apps[0].hosts", 3, "must not be empty"),
    ('[[apps]]\nname = "a"\n', "apps[0].hosts", 1, "missing"),
    ('[[apps]]\nname = "a"\nhosts = ["a.test:8443"]\n', "apps[0].hosts[0]", 3, "without the port"),
    ('[[apps]]\nname = "a b"\nhosts = ["a.test"]\n', "apps[0].name", 2, "bad name"),
    ('[[apps]]\nname = "a"\nhosts = ["a.test"]\nallow = ["finance"]\n', "apps[0].allow[0]", 4, "group:NAME"),
    ('[[apps]]\nname = "a"\nhosts = ["a.test"]\npaths = []\n', "apps[0].paths", 4, "leave the key out"),
    ('[[apps]]\nname = "a"\nhosts = ["a.test"]\n[[apps]]\nname = "a"\nhosts = ["b.test"]\n', "apps[1].name", 5, "duplicate"),
    (
        '[[apps]]\nname = "a"\nhosts = ["a.test"]\n  [[apps.privileged]]\n  paths = ["/x"]\n',
        "apps[0].privileged[0].max_auth_age",
        4,
        "missing",
    ),
    (
        '[[apps]]\nname = "a"\nhosts = ["a.test"]\n  [[apps.privileged]]\n  paths = ["/x"]\n  max_auth_age = "1m"\n'
        '  [[apps.privileged]]\n  paths = ["/y"]\n  max_auth_age = "1m"\n  methods = ["G E T"]\n',
        "apps[0].privileged[1].methods[0]",
        10,
        "HTTP method",
    ),
    ('[[networks]]\nname = "n"\ncidrs = ["10.0.0.0/33"]\n', "networks[0].cidrs[0]", 3, "CIDR"),
    ('[[networks]]\nname = "n"\ncidrs = ["10.0.0.0/8"]\nidle_factor = 0\n', "networks[0].idle_factor", 4, "greater than 0"),
    ('[[networks]]\nname = "n"\ncidrs = ["10.0.0.0/8"]\nabsolute_factor = -1.5\n', "networks[0].absolute_factor", 4, "greater than 0"),
    ('[[networks]]\nname = "n"\ncidrs = ["10.0.0.0/8"]\nidle_factor = "2"\n', "networks[0].idle_factor", 4, "number"),
    ('[oidc]\nissuer = "https://idp.test"\nclient_id = "c"\n', "oidc", 1, "exactly one"),
    ('[oidc]\nissuer = "https://idp.test"\nclient_id = "c"\nclient_secret = "s"\nclient_secret_file = "f"\n', "oidc", 1, "exactly one"),
    ('[oidc]\nissuer = "http://idp.test"\nclient_id = "c"\nclient_secret = "s"\n', "oidc.issuer", 2, "https"),
    ('[oidc]\nissuer = "https://idp.test"\nclient_id = "c"\nclient_secret = "s"\nscopes = ["email"]\n', "oidc.scopes", 5, "openid"),
    ('[oidc]\nissuer = "https://idp.test"\nclient_secret = "s"\n', "oidc.client_id", 1, "missing"),
    ('[sever]\nlisten = "x"\n', "sever", 1, 'unknown table (did you mean "server"?)'),
    ("[server]\nlisten = 8080\n", "server.listen", 2, "expected a string, got 8080"),
    ("server = 1\n", "server", 1, "expected a table"),
]


@pytest.mark.parametrize(("text", "path", "line", "fragment"), ERROR_CASES, ids=[c[1] + ":" + c[3] for c in ERROR_CASES])
def test_each_error_names_its_path_and_line(text: str, path: str, line: int, fragment: str) -> None:
    problem = only_problem(text)
    assert (problem.path, problem.line) == (path, line), problem
    assert fragment in problem.message


def test_every_error_is_reported_not_just_the_first() -> None:
    problems = problems_of(
        """\
        [server]
        mode = "sidecar"
        [defaults]
        preset = "nope"
        idle = "10"
        [[apps]]
        name = "a"
        hosts = ["a.test"]
        colour = "red"
        [[networks]]
        name = "n"
        cidrs = ["10.0.0.1/8"]
        """
    )
    assert [(p.path, p.line) for p in problems] == [
        ("server.mode", 2),
        ("defaults.preset", 4),
        ("defaults.idle", 5),
        ("apps[0].colour", 9),
        ("networks[0].cidrs[0]", 12),
    ]


def test_a_toml_syntax_error_is_one_problem_with_its_line() -> None:
    problem = only_problem('[server]\nlisten = "127.0.0.1:8080"\nmode = \n')
    assert problem.line == 3 and problem.path == ""
    assert problem.message.startswith("TOML syntax error")
    assert "(at line" not in problem.message


def test_load_config_reports_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "missing.toml")
    assert str(caught.value).startswith(str(tmp_path / "missing.toml"))
    (tmp_path / "bad.toml").write_bytes(b'[server]\nlisten = "\xff"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "bad.toml")
    assert caught.value.problems[0].line == 2


def test_load_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "lapse.toml"
    path.write_text(TWO_APPS)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}:11: apps[1].idel: unknown key (did you mean \"idle\"?)"


def test_oidc_secret_file_is_resolved(tmp_path: Path) -> None:
    text = '[oidc]\nissuer = "http://127.0.0.1:5556"\nclient_id = "lapse"\nclient_secret_file = "secrets/oidc"\n'
    oidc = parse_config(text, base_dir=tmp_path).config.oidc
    assert oidc is not None
    assert oidc.client_secret_path == tmp_path / "secrets" / "oidc"
    assert oidc.scopes == ("openid", "profile", "email") and oidc.revalidate_every is None


# -- warnings ------------------------------------------------------------------


def warnings_of(text: str) -> list[Problem]:
    return parse_config(textwrap.dedent(text), source="lapse.toml").warnings


def test_an_explicit_limit_beyond_the_preset_warns() -> None:
    warnings = warnings_of(
        """\
        [defaults]
        preset = "nist-63b4-aal2"
        idle = "2h"
        [[apps]]
        name = "billing"
        hosts = ["billing.test"]
        preset = "pci-dss-4"
        idle = "20m"
        [[apps]]
        name = "wiki"
        hosts = ["wiki.test"]
        absolute = "2d"
        [[apps]]
        name = "strict"
        hosts = ["strict.test"]
        idle = "5m"
        """
    )
    assert [(w.path, w.line) for w in warnings] == [("defaults.idle", 3), ("apps[0].idle", 8), ("apps[1].absolute", 12)]
    assert "nist-63b4-aal2" in warnings[0].message and "1h" in warnings[0].message
    assert "pci-dss-4" in warnings[1].message and "15m" in warnings[1].message
    assert "nist-63b4-aal2" in warnings[2].message and "1d" in warnings[2].message


def test_idle_none_is_more_generous_than_any_preset_value() -> None:
    [warning] = warnings_of('[defaults]\npreset = "hipaa"\nidle = "none"\n')
    assert warning.path == "defaults.idle" and "hipaa" in warning.message
    assert warnings_of('[defaults]\npreset = "nist-63b4-aal1"\nidle = "none"\n') == []


def test_a_limit_above_the_org_ceiling_warns() -> None:
    warnings = warnings_of(
        """\
        [org]
        max_idle = "1h"
        max_absolute = "12h"
        [[apps]]
        name = "a"
        hosts = ["a.test"]
        idle = "2h"
        absolute = "12h"
        """
    )
    assert [(w.path, w.line) for w in warnings] == [("apps[0].idle", 7)]
    assert "org.max_idle" in warnings[0].message and "capped" in warnings[0].message


def test_insecure_http_warns() -> None:
    [warning] = warnings_of('[server]\npublic_url = "http://lapse.corp.test"\ninsecure_http = true\n')
    assert (warning.path, warning.line) == ("server.insecure_http", 3)
    loaded = parse_config('[server]\npublic_url = "http://lapse.corp.test"\ninsecure_http = true\n', source="x.toml")
    assert loaded.config.server.effective_cookie_name == "lapse" and not loaded.config.server.cookie_secure
    assert loaded.format_warnings()[0].startswith("x.toml:3: server.insecure_http: ")


def test_loopback_http_is_secure_enough() -> None:
    server = parse_config('[server]\npublic_url = "http://localhost:8080"\n').config.server
    assert server.cookie_secure and server.effective_cookie_name == "__Host-lapse"


# -- durations (the parser the config relies on) ----------------------------

_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


@given(st.lists(st.tuples(st.sampled_from("dhms"), st.integers(0, 10_000)), min_size=1, max_size=4, unique_by=lambda t: t[0]))
def test_units_largest_first_parse_to_their_sum(parts: list[tuple[str, int]]) -> None:
    parts.sort(key=lambda t: "dhms".index(t[0]))
    text = "".join(f"{n}{unit}" for unit, n in parts)
    total = sum(n * _UNIT_SECONDS[unit] for unit, n in parts)
    if total > 0:
        assert parse_duration(text) == total
    else:
        with pytest.raises(ValueError):
            parse_duration(text)


@given(st.integers(1, 10**9))
def test_format_duration_round_trips(seconds: int) -> None:
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert re.fullmatch(r"(\d+d)?(\d+h)?(\d+m)?(\d+s)?", text)


@settings(max_examples=200)
@given(st.one_of(st.text(max_size=12), st.text(alphabet="0123456789dhms -.+none", max_size=8)))
def test_junk_is_rejected_with_value_error(text: str) -> None:
    try:
        value = parse_duration(text, allow_none=True)
    except ValueError:
        return
    assert value is None or value > 0


@given(st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.lists(st.integers(), max_size=2)))
def test_non_strings_are_rejected_with_value_error(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["0s", "-5m", "15", "1.5h", "30m1h", "1h1h", "", "none", "15 m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_presets_are_all_accepted_by_name() -> None:
    for name in PRESETS:
        assert parse_config(f'[defaults]\npreset = "{name}"\n').config.defaults.preset == name


def test_a_network_factor_past_the_preset_is_warned_about() -> None:
    """policy check asks the compiled policy: office x2 lifts billing past PCI DSS 8.2.8's 15 minutes."""
    text = EXAMPLE.read_text().replace("idle_factor = 1.5", "idle_factor = 2.0")
    loaded = parse_config(text, "lapse.toml", EXAMPLE.parent)
    messages = [(w.path, w.message) for w in loaded.warnings]
    assert ("networks[0]", "network office gives app billing idle 20m, more generous than preset pci-dss-4 (idle 15m)") in messages
    line = next(w.line for w in loaded.warnings if w.path == "networks[0]")
    assert text.splitlines()[line - 1].startswith("[[networks]]")


def test_a_bad_redis_url_is_quoted_without_its_passwords() -> None:
    """Config errors reach logs (journald, CI output): passwords in a store URL never do."""
    with pytest.raises(ConfigError) as err:
        parse_config('[store]\nurl = "redis+sentinel://:hunter2@a:1/m/x?sentinel_password=swordfish"\n')
    assert "hunter2" not in str(err.value) and "swordfish" not in str(err.value) and "//***@" in str(err.value)


def test_huge_durations_and_factors_are_config_errors_not_crashes() -> None:
    """A 330-digit duration overflowed to a traceback (exit 1, no line); a 1e308 network factor passed
    policy check and made every request from that network a 500. Both are now named errors."""
    huge = only_problem('[defaults]\nidle = "' + "9" * 330 + 'd"\n')
    assert (huge.path, huge.line) == ("defaults.idle", 2) and "at most 100 years" in huge.message
    assert parse_duration(f"{100 * 366}d") == 100 * 366 * 86400.0
    with pytest.raises(ValueError, match="at most 100 years"):
        parse_duration(f"{100 * 366}d1s")
    factor = only_problem('[[networks]]\nname = "lan"\ncidrs = ["127.0.0.0/8"]\nidle_factor = 1e308\n')
    assert (factor.path, factor.line) == ("networks[0].idle_factor", 4) and "1000" in factor.message


def test_an_app_an_earlier_one_shadows_and_a_warning_at_once_are_warned_about() -> None:
    """The first app in file order wins: a wildcard before an exact host took billing's PCI limits away
    silently; and a warn_before as long as the idle limit opens the countdown as soon as a page loads."""
    text = textwrap.dedent("""\
        [[apps]]
        name = "wiki"
        hosts = ["*.example.test"]

        [[apps]]
        name = "billing"
        hosts = ["billing.example.test", "pay.other.test"]
        preset = "pci-dss-4"

        [[apps]]
        name = "ops"
        hosts = ["ops.test"]
        idle = "1m"
        warn_before = "1m"
        """)
    loaded = parse_config(text, "lapse.toml")
    assert [(w.path, w.line, w.message) for w in loaded.warnings] == [
        ("apps[1].hosts", 7, "app billing is never chosen for billing.example.test: app wiki comes first in the file "
         "and claims it for every path; list the more specific app first"),
        ("apps[2]", 10, "warn_before 1m is not shorter than idle 1m: the countdown would open as soon as a page loads"),
    ]
    swapped = parse_config(text.replace('"*.example.test"', '"wiki.example.test"'), "lapse.toml")
    assert [w.path for w in swapped.warnings] == ["apps[2]"]
