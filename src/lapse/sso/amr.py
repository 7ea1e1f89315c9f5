"""Whether an ID token's ``amr`` (RFC 8176) shows multi-factor authentication.

``amr`` names the methods used, not how many factors they add up to: ``["otp"]``
is one factor (something you have), as are ``["sms"]``, ``["hwk"]`` and
``["face"]``. So a sign-in counts as MFA only when the IdP says so outright
(``mfa``) or when its methods cover at least two different factor kinds
(NIST SP 800-63B 4.2.1; PCI DSS 8.5.1: "at least two different types").

Values that name no factor kind count for nothing: ``mca`` (multiple-channel:
several channels, which may all carry one factor, e.g. a code read out over a
phone call that is still only "have"; when the channels do carry different
factors, the IdP lists those methods too, and they count), ``user``
(presence), ``rba`` and ``geo`` (risk and location signals), ``wia`` (says
Windows did it, not how), and anything not in RFC 8176. Pure.
"""

from __future__ import annotations

from typing import Any

KNOW, HAVE, ARE = "know", "have", "are"

FACTOR_KIND = {
    "pwd": KNOW, "pin": KNOW, "kba": KNOW,
    "otp": HAVE, "sms": HAVE, "tel": HAVE, "hwk": HAVE, "swk": HAVE, "sc": HAVE, "pop": HAVE,
    "fpt": ARE, "face": ARE, "iris": ARE, "retina": ARE, "vbm": ARE,
}
"""RFC 8176 section 2 method values, by the kind of factor each one proves."""


def is_mfa(amr: Any) -> bool:
    """True iff ``amr`` is a list holding ``"mfa"`` or methods of at least two factor kinds."""
    if not isinstance(amr, list):
        return False
    methods = {a for a in amr if isinstance(a, str)}
    return "mfa" in methods or len({FACTOR_KIND[m] for m in methods if m in FACTOR_KIND}) >= 2


__all__ = ["FACTOR_KIND", "is_mfa"]
