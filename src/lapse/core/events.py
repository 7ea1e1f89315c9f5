"""Audit events: the data every sink receives (CONTRACT.md §5).

The core only builds these; sinks in ``lapse.audit`` write them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# Event names (CONTRACT §5).
LOGIN = "auth.login"
THROTTLED = "auth.throttled"
CREATED = "session.created"
WARNING = "session.warning"
RENEWED = "session.renewed"  # the user kept a warned session (the "stay signed in" heartbeat moved its idle deadline)
EXPIRED = "session.expired"
REVOKED = "session.revoked"
DENIED = "session.denied"
STEP_UP_REQUIRED = "session.step_up_required"
STEP_UP = "session.step_up"
POLICY_CHANGED = "policy.changed"  # a reload replaced the policy (or was refused): what changed, in ``detail``
CONNECTION_TERMINATED = "connection.terminated"  # lapse cut a long-lived connection (WebSocket, stream, PostgreSQL)

SUCCESS = "success"
FAILURE = "failure"


def rfc3339(ts: float) -> str:
    """UTC timestamp with millisecond precision and a ``Z``, as every sink writes it."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class AuditEvent:
    ts: float
    event: str
    outcome: str
    user: str | None = None
    session: str | None = None  # keyed hash of the session ID, never the ID
    app: str | None = None
    ip: str | None = None
    resource: str | None = None  # "METHOD /path" where there is a request
    reason: str | None = None
    activity: dict[str, Any] | None = field(default=None, hash=False)  # end events: the session's activity evidence (core.activity)
    detail: dict[str, Any] | None = field(default=None, hash=False)  # events about lapse itself (policy.changed)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of CONTRACT §5 (``reason`` only where the event has one)."""
        out: dict[str, Any] = {
            "ts": rfc3339(self.ts),
            "event": self.event,
            "outcome": self.outcome,
            "user": self.user,
            "session": self.session,
            "app": self.app,
            "ip": self.ip,
            "resource": self.resource,
        }
        if self.reason is not None:
            out["reason"] = self.reason
        if self.activity is not None:
            out["activity"] = self.activity
        if self.detail is not None:
            out["detail"] = self.detail
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditEvent:
        ts = datetime.fromisoformat(data["ts"].replace("Z", "+00:00")).timestamp()
        return cls(
            ts=ts,
            event=data["event"],
            outcome=data["outcome"],
            user=data.get("user"),
            session=data.get("session"),
            app=data.get("app"),
            ip=data.get("ip"),
            resource=data.get("resource"),
            reason=data.get("reason"),
            activity=data.get("activity"),
            detail=data.get("detail"),
        )
