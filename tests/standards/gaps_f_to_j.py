"""Checklist items 46-85 that lapse FAILS today: honest tests of what the standard asks.

Not collected by pytest (the file name does not match test_*.py); run them with
``pytest tests/standards/gaps_f_to_j.py``: each one fails until lapse is fixed. Every docstring says
what the standard asks, what lapse does instead (observed), and the proposed fix. Traceability:
docs/standards/f_to_j.md.
"""

from __future__ import annotations

import re
from pathlib import Path

from ._f_to_j_harness import (
    cookie,
    gateway,
    run,
)


def test_68_an_mfa_requirement_is_signalled_with_acr_values(tmp_path: Path) -> None:
    """[checklist 68 · RFC 9470 §3] A request whose authentication is too weak (not too old) is refused
    with ``error="insufficient_user_authentication"`` and ``acr_values`` naming the level needed, so the
    client can ask for it; ``max_age`` alone tells it nothing.

    Observed (proxy mode, API client, fresh password-only session, route with ``mfa = true``,
    ``max_auth_age = "1h"``): 401 ``{"reason": "step_up"}`` with
    ``WWW-Authenticate: Bearer error="insufficient_user_authentication", max_age=3600``: an age the session
    already meets, and no ``acr_values``; a client that obeys re-authenticates with the password only and
    loops.
    Fix: ``Gateway.proxy`` (src/lapse/web/app.py, the STEP_UP branch): when the rule has ``mfa`` and the
    session lacks it, add ``acr_values="<lapse's MFA acr>"`` (documented, e.g. the RFC 8176-style
    ``"mfa"``) and an ``error_description``; send ``max_age`` only when the age is what failed.
    """

    async def main() -> None:
        async with gateway(tmp_path, mode="proxy") as h:
            sid = await h.sid()
            r = await h.client.get("/pay/mfa/x", headers=cookie(sid, "application/json"))
            assert (r.status_code, r.json()) == (401, {"reason": "step_up"})
            challenge = r.headers["www-authenticate"]
            assert challenge.startswith('Bearer error="insufficient_user_authentication"')
            assert re.search(r'acr_values="[^"]+"', challenge), challenge

    run(main())

