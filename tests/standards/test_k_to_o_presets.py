"""Checklist §O: each compliance preset CONTRACT.md §2 names, as lapse applies it.

Read through the public surface (``lapse policy explain --json`` on a config whose defaults name the
preset, the same code path as enforcement), then held against the source's own number from the
checklist's §O table: equal to CONTRACT.md's value, and never laxer than the source where the source
gives a number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lapse.cli import cli

M, H, D = 60.0, 3600.0, 86400.0

# preset: (CONTRACT.md idle, CONTRACT.md absolute, source's idle ceiling, source's absolute ceiling);
# a source ceiling of None means the source sets no number (§O: "—", or "no number").
PRESETS: dict[str, tuple[float | None, float, float | None, float | None]] = {
    "pci-dss-4": (15 * M, 12 * H, 15 * M, None),         # PCI DSS 4.0 8.2.8; absolute: suggested 12 h
    "nist-63b4-aal1": (None, 30 * D, None, 30 * D),      # 800-63B-4 §2.1.3: idle MAY; overall <= 30 d
    "nist-63b4-aal2": (1 * H, 24 * H, 1 * H, 24 * H),    # §2.2.3
    "nist-63b4-aal3": (15 * M, 12 * H, 15 * M, 12 * H),  # §2.3.3
    "nist-63b3-aal2": (30 * M, 12 * H, 30 * M, 12 * H),  # rev 3 §4.2.3
    "nist-63b3-aal3": (15 * M, 12 * H, 15 * M, 12 * H),  # rev 3 §4.3.3
    "hipaa": (15 * M, 12 * H, None, None),               # 164.312(a)(2)(iii): no number; common practice
    "disa-stig-user": (15 * M, 12 * H, 15 * M, None),    # APSC-DV-000070
    "disa-stig-admin": (10 * M, 12 * H, 10 * M, None),   # APSC-DV-000080
    "owasp-high-value": (5 * M, 4 * H, 5 * M, 8 * H),    # Session Mgmt CS: 2-5 min, 4-8 h
}


def explain(tmp_path: Path, preset: str) -> dict[str, Any]:
    """``lapse --config F policy explain --json`` for a request under ``[defaults] preset``."""
    conf = tmp_path / "lapse.toml"
    conf.write_text(f'[store]\nurl = "memory://"\n\n[defaults]\npreset = "{preset}"\n')
    checked = CliRunner().invoke(cli, ["policy", "check", str(conf)])
    assert checked.exit_code == 0, checked.output
    r = CliRunner().invoke(cli, ["--config", str(conf), "policy", "explain", "--host", "any.test", "--path", "/",
                                 "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_o_preset_applies_the_contract_value_and_is_never_laxer_than_its_source(tmp_path: Path, preset: str) -> None:
    """[checklist §O] the idle/absolute lapse enforces for the preset, its rule named, against the source."""
    idle, absolute, idle_ceiling, absolute_ceiling = PRESETS[preset]
    got = explain(tmp_path, preset)
    assert (got["idle_timeout_s"], got["absolute_timeout_s"]) == (idle, absolute)
    assert f"preset:{preset}" in got["rules"]
    assert got["sources"]["absolute"] == f"preset:{preset}"
    assert got["sources"]["idle"] == f"preset:{preset}"
    if idle_ceiling is not None:
        assert idle is not None and idle <= idle_ceiling
    if absolute_ceiling is not None:
        assert absolute <= absolute_ceiling


def test_o_an_unknown_preset_is_a_named_config_error(tmp_path: Path) -> None:
    """[checklist §O] a preset lapse does not ship (here the checklist's iso27001-2022) is refused by
    name, never silently replaced by the built-in defaults."""
    conf = tmp_path / "lapse.toml"
    conf.write_text('[defaults]\npreset = "iso27001-2022"\n')
    r = CliRunner().invoke(cli, ["policy", "check", str(conf)])
    assert r.exit_code == 2
    assert "defaults.preset" in r.output and "iso27001-2022" in r.output
