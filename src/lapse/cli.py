"""The ``lapse`` command (CONTRACT.md §1), thin over the rest.

A user's mistake gets a message that names it and a non-zero exit, never a
traceback: configuration errors exit 2, everything else a user can get wrong
exits 1. Passwords are read from standard input only, never echoed, never
taken from argv and never logged.
"""

from __future__ import annotations

import asyncio
import getpass
import io
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import click
import qrcode

from . import __version__, totp
from .audit import AuditSinkFailed
from .audit.remote import redact as redact_sink
from .audit.report import printable
from .config import ConfigError, LoadedConfig, load_config
from .core.decide import expires_at
from .core.durations import format_duration, parse_duration
from .core.events import AuditEvent, rfc3339
from .core.session import HANDLE_LEN, Session
from .identity import UserError, check_name, hash_password
from .runtime import Runtime, open_runtime
from .secret import SecretError
from .store.base import StoreUnavailable, User

T = TypeVar("T")

EXIT_USAGE = 1
EXIT_CONFIG = 2


class Fail(click.ClickException):
    """An error the user can act on: printed as ``error: ...``, exit 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


# ---------------------------------------------------------------- plumbing


def _config_path() -> str | None:
    ctx = click.get_current_context()
    return ctx.find_root().meta.get("lapse.config")


def _load(path: str | None = None) -> LoadedConfig:
    """The config from ``--config``, ``$LAPSE_CONFIG``, ``./lapse.toml``, else built-in defaults."""
    path = path or _config_source()
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(EXIT_CONFIG) from None
    except OSError as exc:
        raise Fail(f"cannot read config {path}: {exc.strerror}") from None
    for warning in loaded.warnings:
        click.echo(f"warning: {_where(loaded, warning.line)}{warning.path}: {warning.message}", err=True)
    return loaded


def _where(loaded: LoadedConfig, line: int | None) -> str:
    return f"{loaded.source}:{line}: " if line else f"{loaded.source}: "


def _run(body: Callable[[Runtime], Awaitable[T]]) -> T:
    """Open the runtime for the current config, run ``body``, turn known failures into messages."""

    loaded = _load()

    async def main() -> T:
        async with open_runtime(loaded) as rt:
            if rt.loaded.config.oidc is None:
                return await body(rt)
            from .web.oidc import revoking  # the ends this command writes revoke refresh tokens too

            async with revoking(rt):
                return await body(rt)

    try:
        return asyncio.run(main())
    except AuditSinkFailed as exc:  # it names the sink; the others got the events
        cause = exc.__cause__
        raise Fail(f"{exc.sink}: {_reason(cause) if isinstance(cause, OSError) else cause}") from None
    except OSError as exc:
        raise Fail(_what_failed(loaded, exc)) from None


def _reason(exc: OSError) -> str:
    return f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else exc.strerror or str(exc)


def _what_failed(loaded: LoadedConfig, exc: OSError) -> str:
    """An OSError while opening the runtime, named by the setting whose file it concerns."""
    cfg = loaded.config
    where = Path(exc.filename) if isinstance(exc.filename, str) else None
    named = [("secret_file", cfg.server.secret_path)] + [
        (f"audit sink {redact_sink(s.spec)}", s.path) for s in cfg.audit.parsed_sinks if s.kind == "jsonl"
    ]
    for setting, path in named:
        if where is not None and path is not None and (where == Path(path) or where in Path(path).parents):
            return f"{setting}: cannot open or create {path}: {_reason(exc)}"
    return _reason(exc)


def _read_password() -> str:
    """One password from stdin: without echo on a terminal, the first line from a pipe."""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise Fail("the passwords differ")
        return first
    line = sys.stdin.readline()
    if not line:
        raise Fail("no password on standard input")
    return line.rstrip("\r\n")


def _require_stdin_flag(flag: bool) -> None:
    if not flag:
        raise Fail("give the password on standard input with --password-stdin (never on the command line)")


def _json(data: Any) -> None:
    click.echo(json.dumps(data, indent=None, separators=(", ", ": ")))


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


# ------------------------------------------------------------------- root


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="lapse", message="%(prog)s %(version)s")
@click.option("--config", "config", metavar="PATH", help="config file (default: $LAPSE_CONFIG, else ./lapse.toml)")
@click.pass_context
def cli(ctx: click.Context, config: str | None) -> None:
    """lapse: session timeout enforcement."""
    if config:
        ctx.meta["lapse.config"] = config


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point. ``--config`` is accepted anywhere on the line, so it is lifted out first."""
    args = list(sys.argv[1:] if argv is None else argv)
    lifted: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--":
            break
        if args[i] == "--config" and i + 1 < len(args):
            lifted = ["--config", args[i + 1]]
            del args[i : i + 2]
            continue
        if args[i].startswith("--config="):
            lifted = ["--config", args[i].split("=", 1)[1]]
            del args[i]
            continue
        i += 1
    try:
        cli.main(args=lifted + args, prog_name="lapse")
    except StoreUnavailable as exc:
        click.echo(f"error: store unavailable: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    except (SecretError, UserError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None


# ------------------------------------------------------------------ serve


@cli.command("serve")
def serve_command() -> None:
    """Run the gateway (forward-auth and/or proxy, per config). SIGHUP reloads the policy; SIGTERM drains."""
    from .web.serve import serve

    loaded = _load()
    serve(loaded, _config_source())


@cli.command("demo")
@click.option("--port", default=8080, show_default=True, help="where the gateway listens (loopback)")
@click.option("--app-port", default=8081, show_default=True, help="where the demo app listens (loopback)")
@click.option("--state", default=".lapse-demo", show_default=True, help="folder for the demo's config, store, secret")
def demo_command(port: int, app_port: int, state: str) -> None:
    """Acme Billing behind lapse (proxy mode), a seeded user, short timeouts: see a session lapse."""
    import secrets as random_source
    import threading

    import uvicorn

    from .demo import create_demo_app, demo_config
    from .web.serve import configure_logging, serve

    folder = Path(state).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    text = demo_config(folder).replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace(
        "127.0.0.1:8081", f"127.0.0.1:{app_port}"
    )
    conf = folder / "lapse.toml"
    conf.write_text(text)
    loaded = _load(str(conf))
    password = random_source.token_urlsafe(9)

    async def seed(rt: Runtime) -> None:
        user = await rt.store.get_user("demo")
        now = await rt.store.now()
        fresh = User("demo", hash_password(password), admin=True, groups=("finance",), created_at=now)
        await rt.store.put_user(fresh if user is None else replace(user, password_hash=fresh.password_hash))

    async def main() -> None:
        async with open_runtime(loaded) as rt:
            await seed(rt)

    asyncio.run(main())
    upstream = uvicorn.Server(uvicorn.Config(create_demo_app(), host="127.0.0.1", port=app_port,
                                             log_level="warning", lifespan="off"))
    threading.Thread(target=upstream.run, name="demo-app", daemon=True).start()
    configure_logging()
    click.echo(
        f"\n  lapse demo: open http://127.0.0.1:{port}/ and sign in as  demo / {password}\n"
        "  Idle limits: 1 minute (30 s under /payments), absolute 10 minutes. The notifications panel\n"
        "  polls passively: it never keeps the session alive. Leave the tab alone and watch it lapse.\n"
        f"  Config, store and audit log: {folder}\n"
        f"  Audit trail: {_self_command()} --config {conf} audit tail\n",
        err=True,
    )
    serve(loaded, str(conf))


def _self_command() -> str:
    """How to run this lapse again: the script beside this Python (a venv's), else ``python -m lapse``."""
    beside = Path(sys.executable).with_name("lapse")
    return str(beside) if beside.exists() else f"{sys.executable} -m lapse"


def _config_source() -> str | None:
    """The config file in use (for reloads), or None for built-in defaults."""
    path = _config_path() or os.environ.get("LAPSE_CONFIG")
    if path is None and Path("lapse.toml").is_file():
        path = "lapse.toml"
    return path


# ----------------------------------------------------------------- policy


@cli.group()
def policy() -> None:
    """Check a config file; explain the policy one request gets."""


@policy.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def policy_check(file: str) -> None:
    """Validate FILE: exit 0 if valid (warnings allowed), else 2 naming each bad key and its line."""
    loaded = _load(file)
    cfg = loaded.config
    click.echo(f"{loaded.source}: ok ({len(cfg.apps)} apps, {len(cfg.networks)} networks, "
               f"{len(loaded.warnings)} warnings)")


@policy.command("explain")
@click.option("--host", required=True, help="the request's host (port ignored)")
@click.option("--path", "path", required=True, help="the request's path (a query string is ignored)")
@click.option("--method", default="GET", show_default=True)
@click.option("--ip", default=None, help="the trusted client IP (selects the network)")
@click.option("--header", "headers", multiple=True, metavar="'K: V'", help="a request header; repeatable")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
def policy_explain(host: str, path: str, method: str, ip: str | None, headers: tuple[str, ...], as_json: bool) -> None:
    """The effective policy for one request, and the rules that produced it."""
    from .config import build_policy
    from .core.policy import PASSIVE_HEADER

    loaded = _load()
    if ip is not None:
        import ipaddress

        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise Fail(f"--ip {ip!r} is not an IP address") from None
    parsed: dict[str, str] = {}
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise Fail(f"--header {header!r}: write it as 'Name: value'")
        parsed[name.strip().lower()] = value.strip()
    passive = parsed.get(PASSIVE_HEADER, "").lower() == "passive"
    effective = build_policy(loaded.config).resolve(host, path.split("?", 1)[0], method.upper(), ip, passive)
    lim = effective.limits
    step = effective.step_up
    allow = None if lim.allow_users is None else sorted(
        [f"user:{u}" for u in lim.allow_users] + [f"group:{g}" for g in lim.allow_groups or ()]
    )
    data: dict[str, Any] = {
        "app": lim.app,
        "network": lim.network,
        "idle_timeout_s": lim.idle,
        "absolute_timeout_s": lim.absolute,
        "warn_before_s": lim.warn_before,
        "activity": "active" if effective.active else "passive",
        "step_up": None if step is None else {"max_auth_age_s": step.max_auth_age, "mfa": step.mfa},
        "allow": allow,
        "on_ip_change": lim.on_ip_change,
        "sources": dict(lim.sources),
        "rules": list(effective.rules),
    }
    if as_json:
        _json(data)
        return
    click.echo(f"app           {lim.app or '(none: defaults)'}")
    click.echo(f"network       {lim.network or '(none)'}")
    click.echo(f"idle          {format_duration(lim.idle):<10} from {lim.sources['idle']}")
    click.echo(f"absolute      {format_duration(lim.absolute):<10} from {lim.sources['absolute']}")
    click.echo(f"warn_before   {format_duration(lim.warn_before):<10} from {lim.sources['warn_before']}")
    click.echo(f"activity      {data['activity']}" + (f" ({effective.activity_rule})" if effective.activity_rule else ""))
    if step is not None:
        click.echo(f"step-up       auth within {format_duration(step.max_auth_age)}" + (", with MFA" if step.mfa else ""))
    if allow is not None:
        click.echo(f"allow         {', '.join(allow)}")
    click.echo(f"on_ip_change  {lim.on_ip_change}")
    click.echo("rules         " + " -> ".join(effective.rules))


# ------------------------------------------------------------------ users


@cli.group()
def users() -> None:
    """Manage local users (the embedded identity source)."""


async def _user_event(rt: Runtime, event: str, name: str) -> None:
    await rt.audit.emit([AuditEvent(await rt.store.now(), event, "success", user=name)])


async def _existing(rt: Runtime, name: str) -> User:
    user = await rt.store.get_user(name)
    if user is None:
        raise Fail(f"no user named {name!r}")
    return user


@users.command("add")
@click.argument("name")
@click.option("--password-stdin", "password_stdin", is_flag=True, help="read the password from standard input")
@click.option("--admin", is_flag=True, help="may use the admin page and revoke any session")
@click.option("--group", "groups", multiple=True, help="a group (for allow rules); repeatable")
def users_add(name: str, password_stdin: bool, admin: bool, groups: tuple[str, ...]) -> None:
    """Create a local user."""
    _require_stdin_flag(password_stdin)
    check_name(name)
    password_hash = hash_password(_read_password())

    async def body(rt: Runtime) -> None:
        if await rt.store.get_user(name) is not None:
            raise Fail(f"user {name!r} already exists")
        # Sign-in and the other commands look names up exactly: alice and ALICE would be two accounts.
        same = next((u.name for u in await rt.store.users() if u.name.casefold() == name.casefold()), None)
        if same is not None:
            raise Fail(f"user {same!r} already exists: names that differ only by case are refused")
        now = await rt.store.now()
        await rt.store.put_user(User(name, password_hash, admin, False, tuple(groups), now))
        await _user_event(rt, "user.created", name)

    _run(body)
    click.echo(f"created user {name}" + (" (admin)" if admin else ""))


@users.command("list")
@click.option("--json", "as_json", is_flag=True)
def users_list(as_json: bool) -> None:
    """Local users and their state."""
    found = _run(lambda rt: rt.store.users())
    rows: list[dict[str, Any]] = [{"name": u.name, "admin": u.admin, "disabled": u.disabled, "groups": list(u.groups),
             "created_at": rfc3339(u.created_at)} for u in found]
    if as_json:
        _json(rows)
    elif not rows:
        click.echo("no users")
    else:
        _table([[r["name"], "yes" if r["admin"] else "", "disabled" if r["disabled"] else "active",
                 ",".join(r["groups"]), r["created_at"]] for r in rows],
               ["NAME", "ADMIN", "STATE", "GROUPS", "CREATED"])


def _set_disabled(name: str, disabled: bool) -> int:
    async def body(rt: Runtime) -> int:
        user = await _existing(rt, name)
        await rt.store.put_user(replace(user, disabled=disabled))
        await _user_event(rt, "user.disabled" if disabled else "user.enabled", name)
        return await rt.gate.revoke_user(name, "user_disabled") if disabled else 0

    return _run(body)


@users.command("disable")
@click.argument("name")
def users_disable(name: str) -> None:
    """Disable a user and end all their sessions."""
    ended = _set_disabled(name, True)
    click.echo(f"disabled {name}; ended {ended} session(s)")


@users.command("enable")
@click.argument("name")
def users_enable(name: str) -> None:
    """Enable a disabled user."""
    _set_disabled(name, False)
    click.echo(f"enabled {name}")


@users.command("delete")
@click.argument("name")
def users_delete(name: str) -> None:
    """Delete a user and end all their sessions."""

    async def body(rt: Runtime) -> int:
        await _existing(rt, name)
        ended = await rt.gate.revoke_user(name, "user_deleted")
        await rt.store.delete_user(name)
        await _user_event(rt, "user.deleted", name)
        return ended

    ended = _run(body)
    click.echo(f"deleted {name}; ended {ended} session(s)")


@users.command("unbind")
@click.argument("name")
def users_unbind(name: str) -> None:
    """Forget which IdP account the name NAME belongs to: the next OIDC sign-in under it takes it.

    For a name given to someone new at the IdP (a new ``sub``). Their sessions are not touched:
    end them with ``lapse sessions revoke --user NAME`` if the name's old holder must go too.
    """

    async def body(rt: Runtime) -> bool:
        from .sso import name_claim

        released = await rt.store.release(name_claim(name))
        if released:
            await _user_event(rt, "user.unbound", name)
        return released

    if not _run(body):
        raise Fail(f"no IdP account holds the name {name!r}")
    click.echo(f"{name} is free: the next OIDC sign-in under it binds it again")


@users.command("passwd")
@click.argument("name")
@click.option("--password-stdin", "password_stdin", is_flag=True, help="read the password from standard input")
@click.option("--end-sessions", is_flag=True, help="also end every session of the user")
def users_passwd(name: str, password_stdin: bool, end_sessions: bool) -> None:
    """Set a user's password."""
    _require_stdin_flag(password_stdin)
    password_hash = hash_password(_read_password())

    async def body(rt: Runtime) -> int:
        user = await _existing(rt, name)
        await rt.store.put_user(replace(user, password_hash=password_hash))
        await _user_event(rt, "user.password_changed", name)
        return await rt.gate.revoke_user(name, "password_changed") if end_sessions else 0

    ended = _run(body)
    click.echo(f"password changed for {name}" + (f"; ended {ended} session(s)" if end_sessions else ""))


@users.command("totp")
@click.argument("name")
@click.option("--reset", is_flag=True, help="replace an existing factor (the old codes stop working)")
@click.option("--remove", is_flag=True, help="remove the factor: the user signs in with the password alone")
def users_totp(name: str, reset: bool, remove: bool) -> None:
    """Enrol a one-time-code (TOTP) factor: prints the otpauth URI, a QR code and recovery codes."""

    async def body(rt: Runtime) -> tuple[str, list[str]] | None:
        user = await _existing(rt, name)
        has = totp.enrolled(user.extra)
        if remove:
            extra = {k: v for k, v in user.extra.items() if k != "totp"}
            await rt.store.put_user(replace(user, extra=extra))
            await _user_event(rt, "user.totp_removed", name)
            return None
        if has and not reset:
            raise Fail(f"user {name!r} already has a one-time-code factor (--reset replaces it, --remove removes it)")
        secret = totp.new_secret()
        factor, codes = totp.enrol(secret)
        await rt.store.put_user(replace(user, extra={**user.extra, "totp": factor.to_dict(rt.sealer, user.name)}))
        await _user_event(rt, "user.totp_enrolled", name)
        return totp.uri(secret, name), codes

    result = _run(body)
    if result is None:
        click.echo(f"removed the one-time-code factor of {name}")
        return
    link, codes = result
    qr = qrcode.QRCode(border=1)
    qr.add_data(link)
    out = io.StringIO()
    qr.print_ascii(out=out)
    click.echo(out.getvalue().rstrip("\n"))
    click.echo(link)
    click.echo(f"\n{name} now signs in with a one-time code. Scan the QR code (or enter the URI) in an "
               "authenticator app now; it is not shown again.")
    click.echo("Recovery codes (each works once, instead of a code; keep them offline):")
    for code in codes:
        click.echo(f"  {code}")


# --------------------------------------------------------------- sessions


@cli.group()
def sessions() -> None:
    """List and end live sessions."""


def _session_row(s: Session, now: float, generous_idle: float, generous_absolute: float) -> dict[str, Any]:
    idle_in = None if math.isinf(generous_idle) else max(0.0, s.last_active_at + generous_idle - now)
    return {
        "handle": s.handle,
        "user": s.user,
        "device": s.device,
        "ip": s.ip,
        "created_at": rfc3339(s.created_at),
        "auth_time": rfc3339(s.auth_time),
        "last_active_at": rfc3339(s.last_active_at),
        "last_seen_at": rfc3339(s.last_seen_at),
        "mfa": s.mfa,
        "idle_expires_in": None if idle_in is None else round(idle_in, 3),
        "absolute_expires_in": round(max(0.0, s.auth_time + generous_absolute - now), 3),
    }


@sessions.command("list")
@click.option("--user", default=None)
@click.option("--json", "as_json", is_flag=True)
def sessions_list(user: str | None, as_json: bool) -> None:
    """Live sessions with their deadlines (by the most generous limits any app grants)."""

    async def body(rt: Runtime) -> list[dict[str, Any]]:
        now = await rt.store.now()
        gi, ga = rt.policy.generous_idle, rt.policy.generous_absolute
        live = [s for s in await rt.store.sessions(user) if expires_at(s.auth_time, s.last_active_at, gi, ga) > now]
        return [_session_row(s, now, gi, ga) for s in live]

    rows = _run(body)
    if as_json:
        _json(rows)
    elif not rows:
        click.echo("no live sessions")
    else:
        def left(x: float | None) -> str:
            return "-" if x is None else format_duration(max(1, round(x)))

        _table([[r["handle"], r["user"], r["device"] or "-", r["ip"] or "-", r["created_at"], r["last_active_at"],
                 left(r["idle_expires_in"]), left(r["absolute_expires_in"])] for r in rows],
               ["HANDLE", "USER", "DEVICE", "IP", "CREATED", "LAST ACTIVE", "IDLE IN", "ABSOLUTE IN"])


@sessions.command("revoke")
@click.argument("handle", required=False)
@click.option("--user", default=None, help="every session of this user")
@click.option("--all", "all_", is_flag=True, help="every live session")
def sessions_revoke(handle: str | None, user: str | None, all_: bool) -> None:
    """End sessions now: one (by HANDLE), a user's, or all."""
    if sum(x is not None and x is not False for x in (handle, user, all_ or None)) != 1:
        raise Fail("give exactly one of HANDLE, --user U or --all")

    async def body(rt: Runtime) -> int:
        if all_:
            return await rt.gate.revoke_all("admin")
        if user is not None:
            return await rt.gate.revoke_user(user, "admin")
        assert handle is not None
        if len(handle) < 6:
            raise Fail(f"handle {handle!r} is too short: give at least 6 characters of it")
        matches = [s for s in await rt.store.sessions() if s.handle.startswith(handle.lower()[:HANDLE_LEN])]
        if not matches:
            raise Fail(f"no live session with handle {handle!r}")
        if len(matches) > 1:
            raise Fail(f"handle {handle!r} matches {len(matches)} sessions: give more of it")
        return int(await rt.gate.revoke(matches[0].key, "admin"))

    ended = _run(body)
    click.echo(f"ended {ended} session(s)")


# ------------------------------------------------------------------ audit


@cli.group()
def audit() -> None:
    """Read the audit log (the ``store`` sink)."""


@audit.command("tail")
@click.option("-n", "count", default=20, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def audit_tail(count: int, as_json: bool) -> None:
    """The newest audit events, oldest first."""

    async def body(rt: Runtime) -> list[AuditEvent]:
        if not any(s.kind == "store" for s in rt.loaded.config.audit.parsed_sinks):
            raise Fail("the audit log is not kept in the store: add \"store\" to [audit] sinks")
        return await rt.store.tail_audit(count)

    for event in _run(body):
        d = event.to_dict()
        if as_json:
            click.echo(json.dumps(d, separators=(",", ":")))
        else:
            fields = [d["ts"], d["event"], d["outcome"], f"user={d['user'] or '-'}"]
            fields += [f"{k}={d[k]}" for k in ("app", "ip", "resource", "reason") if d.get(k)]
            if d["session"]:
                fields.append(f"session={d['session'][:HANDLE_LEN]}")
            click.echo("  ".join(printable(f) for f in fields))  # one event, one line: no forged lines


@audit.command("report")
@click.option("--json", "as_json", is_flag=True, help="one JSON object (CONTRACT.md §5)")
@click.option("--png", "png", metavar="FILE", type=click.Path(dir_okay=False, writable=True),
              help="also write the charts, one panel each (needs lapse[report])")
@click.option("--since", "since", metavar="DURATION", help="how far back to read (default: [report] window)")
@click.option("--jsonl", "jsonl", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="read this jsonl sink file instead of the store sink")
def audit_report(as_json: bool, png: str | None, since: str | None, jsonl: str | None) -> None:
    """What the audit log says: expiries, idle time before them, automation suspects.

    Reads the ``store`` sink (or a ``jsonl:`` sink's file with --jsonl, or the
    configured jsonl sink when there is no store sink) and the live sessions.
    Says on stderr how long it took.
    """
    from .audit import report as rep

    window = None
    if since is not None:
        try:
            window = parse_duration(since)
        except ValueError as exc:
            raise Fail(f"--since: {exc}") from None

    async def body(rt: Runtime) -> dict[str, Any]:
        started = time.perf_counter()
        cfg = rt.loaded.config
        until = await rt.store.now()
        start = until - (window if window is not None else cfg.report.window)
        sinks = cfg.audit.parsed_sinks
        path = Path(jsonl) if jsonl else None
        bad: list[int] = []
        if path is None and not any(s.kind == "store" for s in sinks):
            path = next((s.path for s in sinks if s.kind == "jsonl"), None)
            if path is None:
                raise Fail('no audit log to read: add "store" (or "jsonl:PATH") to [audit] sinks, or give --jsonl')
        if path is not None:
            try:
                events: Any = list(rep.from_jsonl(path, start, until, bad))
            except OSError as exc:
                raise Fail(f"cannot read {path}: {exc.strerror or exc}") from None
            source = f"jsonl:{path}"
            if bad:
                click.echo(f"warning: {path}: skipped {len(bad)} malformed line(s), the first at line {bad[0]}",
                           err=True)
        else:
            events = await rep.from_store(rt.store, start, until)
            source = "store"
        live = await rt.store.sessions()
        return rep.build(events, live, rep.Thresholds.from_config(cfg.report), since=start, until=until,
                         source=source, started=started, skipped=len(bad))

    report = _run(body)
    if png:
        from .audit.plots import ChartsUnavailable, render_png

        try:
            data = render_png(report)
        except ChartsUnavailable as exc:
            raise Fail(str(exc)) from None
        try:
            Path(png).write_bytes(data)
        except OSError as exc:
            raise Fail(f"cannot write {png}: {exc.strerror or exc}") from None
    if as_json:
        click.echo(json.dumps(report, separators=(",", ":"), allow_nan=False))  # build lets no NaN through
    else:
        click.echo(rep.summary(report))
    wrote = f", charts in {png}" if png else ""
    click.echo(f"report: {report['events_read']} events read in {report['took_s']:.2f} s{wrote}", err=True)
