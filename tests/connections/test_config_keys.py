"""The configuration keys of long-lived connections: ``websocket_activity`` and ``[[postgres]]``."""

from __future__ import annotations

import pytest

from lapse.config import ConfigError, build_policy, parse_config, postgres_host


def _problems(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return str(caught.value)


def test_websocket_activity_must_be_a_regular_expression() -> None:
    text = '[defaults]\nwebsocket_activity = "(unclosed"\n'
    problems = _problems(text)
    assert "defaults.websocket_activity" in problems and ":2:" in problems and "bad regular expression" in problems
    ok = parse_config('[[apps]]\nname = "chat"\nhosts = ["chat.test"]\nwebsocket_activity = "^(?!ping)"\n')
    assert ok.config.apps[0].websocket_activity == "^(?!ping)"


def test_postgres_listener_policy_resolves_like_an_app() -> None:
    loaded = parse_config("""
[org]
max_idle = "20m"

[[postgres]]
name = "billing-db"
listen = "127.0.0.1:6432"
upstream = "127.0.0.1:5432"
preset = "pci-dss-4"
absolute = "2h"
""")
    pg = loaded.config.postgres[0]
    assert (pg.name, pg.listen, pg.upstream) == ("billing-db", "127.0.0.1:6432", "127.0.0.1:5432")
    limits = build_policy(loaded.config).resolve(postgres_host("billing-db"), "/billing", "CONNECT", None).limits
    assert (limits.app, limits.idle, limits.absolute) == ("billing-db", 15 * 60, 2 * 3600)
    other = build_policy(loaded.config).resolve("billing-db", "/", "GET", None).limits
    assert other.app is None  # a web request can never land on the database's policy


def test_postgres_listener_errors_name_the_key() -> None:
    problems = _problems("""
[[apps]]
name = "db"
hosts = ["db.test"]

[[postgres]]
name = "db"
listen = "127.0.0.1:8080"
upstream = "127.0.0.1:5432"
idel = "5m"
""")
    assert "postgres[0].idel" in problems
    problems = _problems("""
[[apps]]
name = "db"
hosts = ["db.test"]

[[postgres]]
name = "db"
listen = "127.0.0.1:8080"
upstream = "127.0.0.1:5432"
""")
    assert "postgres[0].name" in problems and "apps[0]" in problems
    assert "postgres[0].listen" in problems and "server.listen" in problems


def test_postgres_listener_refuses_group_allow_rules() -> None:
    """Finding 6: a PostgreSQL sign-in carries no groups, so ``group:`` never matched: a silent lock-out."""
    problems = _problems("""
[[postgres]]
name = "db"
listen = "127.0.0.1:6432"
upstream = "127.0.0.1:5432"
allow = ["user:alice", "group:dba"]
""")
    assert "postgres[0].allow[1]" in problems and "can never match" in problems
