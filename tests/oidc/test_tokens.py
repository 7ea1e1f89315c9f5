"""ID token and logout token validation (lapse.sso.tokens), with keys made here.

Requirement IDs are those of ../shared/research/standards-checklist.md: BCL =
OpenID Connect Back-Channel Logout 1.0, Core = OpenID Connect Core 1.0.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jws, jwt
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey

from lapse.sso.tokens import (
    BACKCHANNEL_EVENT,
    Expect,
    TokenError,
    UnknownKey,
    allowed_algorithms,
    check_id_token,
    check_logout_token,
)

ISS = "https://idp.test"
CLIENT = "lapse"
NOW = 1_700_000_000.0
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)
OTHER = RSAKey.generate_key(2048, parameters={"kid": "k1"}, private=True)  # same kid, another key: a forgery
EC = ECKey.generate_key("P-256", parameters={"kid": "e1"}, private=True)
KEYS = KeySet.import_key_set({"keys": [KEY.as_dict(private=False), EC.as_dict(private=False)]})
EXPECT = Expect(ISS, CLIENT)


def sign(claims: dict[str, Any], *, key: Any = KEY, alg: str = "RS256", **head: Any) -> str:
    header = {"alg": alg, "kid": key.kid, **head}
    header = {k: v for k, v in header.items() if v is not None}
    return jwt.encode(header, claims, key)


def id_claims(**changes: Any) -> dict[str, Any]:
    c = {"iss": ISS, "aud": CLIENT, "sub": "alice", "iat": NOW - 5, "exp": NOW + 300, "nonce": "n-1",
         "auth_time": NOW - 30, "sid": "S1"}
    c.update(changes)
    return {k: v for k, v in c.items() if v is not None}


def logout_claims(**changes: Any) -> dict[str, Any]:
    c = {"iss": ISS, "aud": CLIENT, "sub": "alice", "sid": "S1", "iat": NOW - 5, "exp": NOW + 115, "jti": "j-1",
         "events": {BACKCHANNEL_EVENT: {}}}
    c.update(changes)
    return {k: v for k, v in c.items() if v is not None}


def logout(token: str, *, require_typ: bool = False) -> Any:
    return check_logout_token(token, KEYS, EXPECT, now=NOW, require_typ=require_typ)


def reason_of(call: Any) -> str:
    with pytest.raises(TokenError) as info:
        call()
    return info.value.reason


def unsigned(claims: dict[str, Any], head: dict[str, Any]) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc(head)}.{enc(claims)}."


# -------------------------------------------------------------- ID tokens


def test_a_good_id_token_passes_with_its_auth_time_and_sid() -> None:
    got = check_id_token(sign(id_claims()), KEYS, EXPECT, nonce="n-1", now=NOW)
    assert (got.sub, got.auth_time, got.sid) == ("alice", NOW - 30, "S1")


def test_an_ec_signed_id_token_passes_and_one_without_kid_too() -> None:
    assert check_id_token(sign(id_claims(), key=EC, alg="ES256"), KEYS, EXPECT, nonce="n-1", now=NOW).sub == "alice"
    token = jwt.encode({"alg": "RS256"}, id_claims(), KEY)
    assert check_id_token(token, KEYS, EXPECT, nonce="n-1", now=NOW).sub == "alice"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"iss": "https://evil.test"}, "bad_iss"),
        ({"aud": "someone-else"}, "bad_aud"),
        ({"aud": [CLIENT, "other"]}, "bad_azp"),  # several audiences need azp = us (Core 3.1.3.7 step 4-5)
        ({"exp": NOW - 120}, "expired"),
        ({"exp": None}, "missing_exp"),
        ({"iat": NOW + 600}, "iat_in_future"),
        ({"nonce": "n-2"}, "bad_nonce"),
        ({"nonce": None}, "bad_nonce"),
        ({"sub": None}, "missing_sub"),
        ({"auth_time": "yesterday"}, "bad_auth_time"),
        ({"auth_time": NOW + 3600}, "auth_time_in_future"),
        ({"nbf": NOW + 86400 * 30}, "not_yet_valid"),  # RFC 7519 4.1.5
        ({"nbf": NOW + 61}, "not_yet_valid"),
        ({"nbf": "soon"}, "bad_nbf"),
    ],
)
def test_id_token_claims_are_checked(changes: dict[str, Any], reason: str) -> None:
    """[Core 3.1.3.7] iss, aud/azp, exp, iat, nonce; auth_time a sane number."""
    assert reason_of(lambda: check_id_token(sign(id_claims(**changes)), KEYS, EXPECT, nonce="n-1", now=NOW)) == reason


def test_id_token_forged_none_hmac_and_unknown_kid_are_refused() -> None:
    forged = sign(id_claims(), key=OTHER)
    assert reason_of(lambda: check_id_token(forged, KEYS, EXPECT, nonce="n-1", now=NOW)) == "bad_signature"
    none = unsigned(id_claims(), {"alg": "none", "kid": "k1"})
    assert reason_of(lambda: check_id_token(none, KEYS, EXPECT, nonce="n-1", now=NOW)) == "bad_alg"
    # HMAC with a key an attacker could know (the RSA public key's bytes, the classic confusion).
    hs = jwt.encode({"alg": "HS256", "kid": "k1"}, id_claims(), OctKey.import_key(b"x" * 32))
    assert reason_of(lambda: check_id_token(hs, KEYS, EXPECT, nonce="n-1", now=NOW)) == "bad_alg"
    rotated = sign(id_claims(), key=RSAKey.generate_key(2048, parameters={"kid": "k2"}, private=True))
    with pytest.raises(UnknownKey) as info:
        check_id_token(rotated, KEYS, EXPECT, nonce="n-1", now=NOW)
    assert info.value.kid == "k2"


def test_an_algorithm_outside_the_allow_list_is_refused() -> None:
    only_es = Expect(ISS, CLIENT, allowed_algorithms(["ES256", "HS256", "none"]))
    assert only_es.algorithms == ("ES256",)
    assert reason_of(lambda: check_id_token(sign(id_claims()), KEYS, only_es, nonce="n-1", now=NOW)) == "bad_alg"


def test_encrypted_and_garbage_tokens_are_refused() -> None:
    assert reason_of(lambda: check_id_token("a.b.c.d.e", KEYS, EXPECT, nonce="n", now=NOW)) == "encrypted"
    for junk in ("", "abc", "a.b", "!!.!!.!!", "e30.e30.e30", "x" * 20000):
        assert reason_of(lambda junk=junk: check_id_token(junk, KEYS, EXPECT, nonce="n", now=NOW)) in {
            "malformed", "bad_alg"}


# ----------------------------------------------------------- logout tokens


def test_a_good_logout_token_passes() -> None:
    """[BCL 2.4 / checklist 88] all REQUIRED claims, sid, RS256, typ=logout+jwt."""
    got = logout(sign(logout_claims(), typ="logout+jwt"), require_typ=True)
    assert (got.jti, got.sub, got.sid) == ("j-1", "alice", "S1")


def test_sub_alone_or_sid_alone_is_enough_and_exp_may_be_absent() -> None:
    """exp stays optional (Keycloak < 23.0.4, authentik < 2025.8.2, Ory Hydra omit it); iat bounds the token."""
    assert logout(sign(logout_claims(sid=None))).sub == "alice"
    assert logout(sign(logout_claims(sub=None))).sid == "S1"
    assert logout(sign(logout_claims(exp=None))).exp is None
    assert reason_of(lambda: logout(sign(logout_claims(exp=None, iat=NOW - 601 - 60)))) == "too_old"


def test_nbf_within_the_leeway_or_past_is_accepted() -> None:
    """Clock skew: an nbf up to LEEWAY ahead of our clock is the IdP's clock running fast, not a future token."""
    assert check_id_token(sign(id_claims(nbf=NOW + 60)), KEYS, EXPECT, nonce="n-1", now=NOW).sub == "alice"
    assert check_id_token(sign(id_claims(nbf=NOW - 5)), KEYS, EXPECT, nonce="n-1", now=NOW).sub == "alice"
    assert logout(sign(logout_claims(nbf=NOW - 5, exp=None))).jti == "j-1"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"iss": "https://evil.test"}, "bad_iss"),
        ({"aud": "someone-else"}, "bad_aud"),
        ({"exp": NOW - 300}, "expired"),
        ({"iat": NOW + 600}, "iat_in_future"),
        ({"iat": None}, "missing_iat"),
        ({"iat": NOW - 7200, "exp": None}, "too_old"),
        ({"sub": None, "sid": None}, "missing_sub_and_sid"),
        ({"events": None}, "bad_events"),
        ({"events": {"http://schemas.openid.net/event/other": {}}}, "bad_events"),
        ({"events": {BACKCHANNEL_EVENT: "yes"}}, "bad_events"),
        ({"events": [BACKCHANNEL_EVENT]}, "bad_events"),
        ({"nonce": "n-1"}, "nonce_present"),
        ({"jti": None}, "missing_jti"),
        ({"nbf": NOW + 86400 * 30}, "not_yet_valid"),
        ({"nbf": NOW + 86400 * 30, "exp": None}, "not_yet_valid"),
        ({"nbf": True}, "bad_nbf"),
    ],
)
def test_logout_token_rules_each_refuse(changes: dict[str, Any], reason: str) -> None:
    """[BCL 2.6 / checklist 89] one negative case per rule."""
    assert reason_of(lambda: logout(sign(logout_claims(**changes)))) == reason


def test_logout_typ_is_required_only_when_configured() -> None:
    """[BCL 2.3, ASVS 5.0 10.5.5 / checklist 92] require_logout_typ on: untyped -> refused; off: accepted."""
    plain = sign(logout_claims())
    assert logout(plain).jti == "j-1"
    assert reason_of(lambda: logout(plain, require_typ=True)) == "bad_typ"
    assert reason_of(lambda: logout(sign(logout_claims(), typ="JWT"), require_typ=True)) == "bad_typ"
    assert logout(sign(logout_claims(), typ="application/logout+jwt"), require_typ=True).jti == "j-1"


def test_logout_token_forged_or_unsigned_is_refused() -> None:
    """[BCL 2.6] signature as for ID tokens; alg none MUST NOT be used."""
    assert reason_of(lambda: logout(sign(logout_claims(), key=OTHER))) == "bad_signature"
    assert reason_of(lambda: logout(unsigned(logout_claims(), {"alg": "none"}))) == "bad_alg"
    assert reason_of(lambda: logout(unsigned(logout_claims(), {"alg": "None", "kid": "k1"}))) == "bad_alg"


# ------------------------------------------------------------- properties

claim_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
                         st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5), st.none(), max_size=2))
claim_names = st.sampled_from(["iss", "aud", "iat", "exp", "jti", "events", "sub", "sid", "nonce", "azp"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(claim_names, claim_values, max_size=4))
def test_any_tampering_with_a_logout_token_either_passes_all_rules_or_is_refused(changes: dict[str, Any]) -> None:
    """Whatever claims an attacker writes: if the token is accepted, every rule of BCL 2.6 holds."""
    claims = logout_claims(**changes)  # a None removes the claim
    try:
        got = logout(sign(claims))
    except TokenError:
        return
    assert claims["iss"] == ISS and CLIENT in ([claims["aud"]] if isinstance(claims["aud"], str) else claims["aud"])
    assert "nonce" not in claims and isinstance(claims["events"][BACKCHANNEL_EVENT], dict)
    assert got.sub or got.sid
    assert claims["iat"] <= NOW + EXPECT.leeway


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=2))
def test_any_bit_flip_in_the_payload_or_signature_is_refused(noise: bytes, part: int) -> None:
    """A forged signature never passes: changing any part of a signed token is a refusal, never a crash."""
    token = sign(logout_claims())
    pieces = token.split(".")
    flipped = base64.urlsafe_b64encode(noise).rstrip(b"=").decode()
    if flipped == pieces[part]:
        return
    pieces[part] = flipped
    with pytest.raises(TokenError):
        logout(".".join(pieces))


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["none", "None", "NONE", "HS256", "HS512", "", "RS1"]))
def test_no_weak_algorithm_is_ever_accepted(alg: str) -> None:
    """[BCL 2.6 / Core 3.1.3.7] never none, never an HMAC the client could forge."""
    assert reason_of(lambda: logout(unsigned(logout_claims(), {"alg": alg, "kid": "k1"}))) == "bad_alg"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_deeply_nested_header_or_payload_is_malformed_not_a_crash() -> None:
    """M4: "[[[[..." in the JOSE header (or a signed payload) is TokenError("malformed"), never RecursionError."""
    for depth in (1500, 6000):  # 1500 fits under the header cap and still nests past the parser's limit
        with pytest.raises(TokenError) as err:
            logout(_b64(b"[" * depth) + ".e30.c2ln")
        assert err.value.reason == "malformed"
    nested = jws.serialize_compact({"alg": "RS256", "kid": KEY.kid}, b"[" * 6000, KEY)
    with pytest.raises(TokenError) as err:
        logout(nested)
    assert err.value.reason == "malformed"
