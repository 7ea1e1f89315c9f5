"""MFA from ``amr`` (RFC 8176): one method, or one factor kind, is not MFA, whatever the method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lapse.sso.amr import ARE, FACTOR_KIND, HAVE, KNOW, is_mfa

from .test_callback import Rp, run

NO_FACTOR = ["mca", "user", "rba", "geo", "wia", "ngcmfa", "fido", ""]
VALUES = sorted(FACTOR_KIND) + NO_FACTOR
JUNK = st.one_of(st.integers(), st.none(), st.booleans(), st.lists(st.text(max_size=3), max_size=2))


def of_kind(kind: str) -> list[str]:
    return [m for m, k in FACTOR_KIND.items() if k == kind]


@pytest.mark.parametrize("amr", [["sms"], ["otp"], ["hwk"], ["pop"], ["face"], ["pwd"], ["mca"], ["pwd", "pin", "kba"],
                                 ["otp", "sms", "hwk", "swk", "sc", "pop", "tel"], ["fpt", "face"], ["mca", "pwd"],
                                 ["mca", "otp", "user"], [], "mfa", None, {"mfa": True}, [["mfa"]]])
def test_one_factor_kind_is_not_mfa(amr: Any) -> None:
    assert is_mfa(amr) is False


@pytest.mark.parametrize("amr", [["mfa"], ["pwd", "otp"], ["pwd", "hwk"], ["hwk", "fpt"], ["pin", "face"],
                                 ["sms", "kba"], ["mca", "pwd", "sms"], ["otp", 7, "pwd"]])
def test_two_factor_kinds_or_mfa_is_mfa(amr: Any) -> None:
    assert is_mfa(amr) is True


@given(st.sampled_from([KNOW, HAVE, ARE]).flatmap(
    lambda kind: st.lists(st.sampled_from(of_kind(kind) + NO_FACTOR) | JUNK, max_size=12)))
def test_any_list_of_one_factor_kind_is_not_mfa(amr: list[Any]) -> None:
    assert is_mfa(amr) is False


@given(st.lists(st.sampled_from(VALUES) | JUNK, max_size=12), st.sampled_from([KNOW, HAVE, ARE]),
       st.sampled_from([KNOW, HAVE, ARE]), st.data())
def test_two_different_kinds_anywhere_in_the_list_make_mfa(amr: list[Any], a: str, b: str, data: Any) -> None:
    if a == b:
        return
    first, second = data.draw(st.sampled_from(of_kind(a))), data.draw(st.sampled_from(of_kind(b)))
    at = data.draw(st.integers(0, len(amr)))
    assert is_mfa(amr[:at] + [first] + amr[at:] + [second]) is True


@given(st.lists(st.sampled_from(VALUES + ["mfa"]) | JUNK, max_size=12), st.sampled_from(VALUES + ["mfa"]))
def test_mfa_iff_said_or_two_kinds_and_more_methods_never_take_it_away(amr: list[Any], extra: str) -> None:
    kinds = {FACTOR_KIND[a] for a in amr if isinstance(a, str) and a in FACTOR_KIND}
    assert is_mfa(amr) is ("mfa" in amr or len(kinds) >= 2)
    assert not is_mfa(amr) or is_mfa(amr + [extra])


@pytest.mark.parametrize(("amr", "mfa"), [(["sms"], False), (["hwk"], False), (["face"], False),
                                          (["pwd", "otp"], True), (["mfa"], True)])
def test_the_session_is_mfa_only_for_two_factor_kinds(tmp_path: Path, amr: list[str], mfa: bool) -> None:
    """Through the callback: session.mfa and the auth.login factor follow ``is_mfa``."""
    async def body(rp: Rp) -> None:
        r = await rp.sign_in(preferred_username="carol", amr=amr)
        assert r.status_code == 303
        (session,) = await rp.rt.store.sessions()
        assert session.mfa is mfa
        assert await rp.logins() == [("success", "carol", "oidc_mfa" if mfa else "oidc")]
    run(tmp_path, body)
