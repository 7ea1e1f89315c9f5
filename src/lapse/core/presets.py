"""Compliance presets: sourced starting points for ``idle`` and ``absolute``.

A preset sets those two keys only. Each value sits beside the clause it comes
from; where the source gives no number, the value is common practice and is
marked ``COMMON_PRACTICE`` (see shared/research/standards-checklist.md §O).
Presets are not locks: an explicit key may go beyond them (``policy check``
warns), and the organisation ceiling still caps everything.
"""

from __future__ import annotations

from dataclasses import dataclass

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0

COMMON_PRACTICE = "common practice (the source sets no number)"


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    idle: float | None  # None: the source requires no inactivity timeout
    absolute: float
    idle_source: str
    absolute_source: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "pci-dss-4",
            idle=15 * MINUTE,  # PCI DSS v4.0.1 Req. 8.2.8: "idle for more than 15 minutes"
            absolute=12 * HOUR,  # PCI sets none; NIST SP 800-63B rev 3 §4.2.3/§4.3.3 value
            idle_source="PCI DSS v4.0.1 Req. 8.2.8",
            absolute_source="NIST SP 800-63B rev 3 §4.2.3 (PCI DSS sets no absolute limit)",
        ),
        Preset(
            "nist-63b4-aal1",
            idle=None,  # SP 800-63B-4 §2.1.3: an inactivity timeout "MAY be applied but is not required"
            absolute=30 * DAY,  # §2.1.3: overall timeout "SHOULD be no more than 30 days"
            idle_source="NIST SP 800-63B-4 §2.1.3",
            absolute_source="NIST SP 800-63B-4 §2.1.3",
        ),
        Preset(
            "nist-63b4-aal2",
            idle=1 * HOUR,  # SP 800-63B-4 §2.2.3: inactivity "SHOULD be no more than 1 hour"
            absolute=24 * HOUR,  # §2.2.3: overall "SHOULD be no more than 24 hours"
            idle_source="NIST SP 800-63B-4 §2.2.3",
            absolute_source="NIST SP 800-63B-4 §2.2.3",
        ),
        Preset(
            "nist-63b4-aal3",
            idle=15 * MINUTE,  # SP 800-63B-4 §2.3.3: inactivity "SHOULD be no more than 15 minutes"
            absolute=12 * HOUR,  # §2.3.3: overall "SHALL be no more than 12 hours"
            idle_source="NIST SP 800-63B-4 §2.3.3",
            absolute_source="NIST SP 800-63B-4 §2.3.3",
        ),
        Preset(
            "nist-63b3-aal2",
            idle=30 * MINUTE,  # SP 800-63B rev 3 §4.2.3: "inactivity lasting 30 minutes or longer"
            absolute=12 * HOUR,  # §4.2.3: "at least once per 12 hours"
            idle_source="NIST SP 800-63B rev 3 §4.2.3",
            absolute_source="NIST SP 800-63B rev 3 §4.2.3",
        ),
        Preset(
            "nist-63b3-aal3",
            idle=15 * MINUTE,  # SP 800-63B rev 3 §4.3.3: "inactivity lasting 15 minutes or longer"
            absolute=12 * HOUR,  # §4.3.3: "at least once per 12 hours"
            idle_source="NIST SP 800-63B rev 3 §4.3.3",
            absolute_source="NIST SP 800-63B rev 3 §4.3.3",
        ),
        Preset(
            "hipaa",
            idle=15 * MINUTE,  # 45 CFR §164.312(a)(2)(iii): "predetermined time of inactivity", no number
            absolute=12 * HOUR,  # HIPAA sets none
            idle_source=f"45 CFR §164.312(a)(2)(iii); 15 minutes is {COMMON_PRACTICE}",
            absolute_source=f"{COMMON_PRACTICE}; HIPAA sets no absolute limit",
        ),
        Preset(
            "disa-stig-user",
            idle=15 * MINUTE,  # DISA ASD STIG APSC-DV-000070 (V-222389): "15 minute idle time period"
            absolute=12 * HOUR,  # the STIG sets none
            idle_source="DISA ASD STIG APSC-DV-000070 (V-222389)",
            absolute_source=f"{COMMON_PRACTICE}; the STIG sets no absolute limit",
        ),
        Preset(
            "disa-stig-admin",
            idle=10 * MINUTE,  # DISA ASD STIG APSC-DV-000080 (V-222390): admin sessions, 10 minutes
            absolute=12 * HOUR,  # the STIG sets none
            idle_source="DISA ASD STIG APSC-DV-000080 (V-222390)",
            absolute_source=f"{COMMON_PRACTICE}; the STIG sets no absolute limit",
        ),
        Preset(
            "owasp-high-value",
            idle=5 * MINUTE,  # OWASP Session Management Cheat Sheet: "2-5 minutes" for high-value apps
            absolute=4 * HOUR,  # same: "4-8 hours"; the strict end of the range
            idle_source="OWASP Session Management Cheat Sheet, Session Expiration (2-5 minutes)",
            absolute_source="OWASP Session Management Cheat Sheet, Session Expiration (4-8 hours)",
        ),
    )
}
