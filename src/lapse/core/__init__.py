"""The pure decision core: no I/O, no clock reads, no logging (ARCHITECTURE.md).

Adapters import from here; this package imports none of them.
"""

from .decide import Decision, Reason, Request, app_deadlines, decide, revoke, sign_in, sweep
from .durations import format_duration, parse_duration
from .events import AuditEvent
from .policy import AppSpec, Effective, Layer, Limits, NetworkSpec, Policy, PolicySpec, PrivilegedSpec, compile_policy
from .presets import PRESETS
from .session import Session, session_key

__all__ = [
    "PRESETS",
    "AppSpec",
    "AuditEvent",
    "Decision",
    "Effective",
    "Layer",
    "Limits",
    "NetworkSpec",
    "Policy",
    "PolicySpec",
    "PrivilegedSpec",
    "Reason",
    "Request",
    "Session",
    "app_deadlines",
    "compile_policy",
    "decide",
    "format_duration",
    "parse_duration",
    "revoke",
    "session_key",
    "sign_in",
    "sweep",
]
