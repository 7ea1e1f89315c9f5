"""Values kept sealed at rest (TOTP seeds, OIDC tokens): they open only with the same secret file and
for the same owner, any change to them is detected, and values stored before sealing still read."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lapse.sealed import PREFIX, Sealer, SealError
from lapse.secret import Secrets

SEALER = Sealer(Secrets(bytes(range(32))).seal_key)


@settings(max_examples=200)
@given(plain=st.text(max_size=300), owner=st.text(max_size=40))
def test_what_is_sealed_opens_for_its_owner_only(plain, owner):
    sealed = SEALER.seal(plain, owner)
    assert sealed.startswith(PREFIX) and (len(plain) < 8 or plain not in sealed[len(PREFIX):])
    assert SEALER.open(sealed, owner) == plain
    with pytest.raises(SealError):
        SEALER.open(sealed, owner + "x")
    with pytest.raises(SealError):
        Sealer(Secrets(bytes(32)).seal_key).open(sealed, owner)  # another secret file


def test_each_seal_is_fresh():
    assert SEALER.seal("JBSWY3DPEHPK3PXP", "totp:alice") != SEALER.seal("JBSWY3DPEHPK3PXP", "totp:alice")


@settings(max_examples=200)
@given(position=st.integers(min_value=len(PREFIX), max_value=200), junk=st.text(min_size=1, max_size=3))
def test_an_altered_value_does_not_open(position, junk):
    sealed = SEALER.seal("a refresh token", "oidc:k")
    altered = sealed[:position] + junk + sealed[position + len(junk):]
    if altered != sealed:
        with pytest.raises(SealError):
            SEALER.open(altered, "oidc:k")


def test_any_str_an_idp_could_send_seals_and_opens():
    token = "a\ud800b\udfffc"  # lone surrogates: valid JSON escapes, not valid UTF-8
    assert SEALER.open(SEALER.seal(token, "oidc:k"), "oidc:k") == token


def test_a_value_from_before_sealing_reads_as_it_is():
    assert SEALER.open("JBSWY3DPEHPK3PXP", "totp:alice") == "JBSWY3DPEHPK3PXP"
