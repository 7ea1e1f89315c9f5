"""One-time codes: a ±1 step window, never the same step twice, recovery codes once each."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lapse import totp
from lapse.sealed import Sealer, SealError

SECRET = totp.new_secret()


@given(st.integers(1_600_000_000, 2_000_000_000), st.integers(-3, 3))
def test_codes_are_accepted_one_step_either_side_and_only_once(now, offset):
    factor, _ = totp.enrol(SECRET)
    code = totp.code_at(SECRET, now + offset * totp.STEP)
    accepted = totp.verify(factor, code, now)
    if abs(offset) <= totp.WINDOW:
        assert accepted is not None
        assert totp.verify(accepted, code, now) is None  # replayed
        assert accepted.last_step >= (now // totp.STEP) - 1
    elif accepted is not None:  # a code of another step may coincide with one in the window (1 in 10^6)
        assert any(totp.code_at(SECRET, now + k * totp.STEP) == code for k in (-1, 0, 1))


def test_an_older_code_after_a_newer_one_is_refused():
    factor, _ = totp.enrol(SECRET)
    now = 1_800_000_000
    newer = totp.verify(factor, totp.code_at(SECRET, now), now)
    assert newer is not None
    assert totp.verify(newer, totp.code_at(SECRET, now - totp.STEP), now) is None


def test_recovery_codes_are_stored_hashed_and_spent_once():
    factor, codes = totp.enrol(SECRET)
    assert len(set(codes)) == totp.RECOVERY_CODES and not set(codes) & set(factor.recovery)
    spent = totp.verify(factor, codes[3].upper(), 0)  # case and spacing forgiven
    assert spent is not None and len(spent.recovery) == totp.RECOVERY_CODES - 1
    assert totp.verify(spent, codes[3], 0) is None
    assert totp.verify(factor, "zzzzz-zzzzz", 0) is None
    sealer = Sealer(bytes(32))
    stored = spent.to_dict(sealer, "alice")
    assert SECRET not in str(stored) and not set(spent.recovery) & set(str(stored).split("'"))  # sealed at rest
    assert totp.Factor.from_extra({"totp": stored}, sealer, "alice") == spent
    with pytest.raises(SealError):
        totp.Factor.from_extra({"totp": stored}, sealer, "mallory")
    legacy = {"secret": SECRET, "last_step": spent.last_step, "recovery": list(spent.recovery)}
    assert totp.Factor.from_extra({"totp": legacy}, sealer, "alice") == spent  # stored before sealing


def test_factors_stored_before_sealing_are_sealed_at_start_and_still_work(tmp_path):
    """Upgrading: `lapse serve` seals plain seeds and bare recovery hashes once (idempotent); the codes
    keep working; a factor sealed under another secret file is left alone, not a failed start."""
    import asyncio

    from lapse.config import parse_config
    from lapse.runtime import open_runtime, seal_stored_factors
    from lapse.store.base import User

    async def main():
        loaded = parse_config('[store]\nurl = "sqlite:///lapse.db"\n', "lapse.toml", tmp_path)
        async with open_runtime(loaded) as rt:
            factor, codes = totp.enrol(SECRET)
            legacy = {"secret": SECRET, "last_step": -1, "recovery": list(factor.recovery)}
            foreign = Sealer(bytes(32)).seal(SECRET, "totp:carol")
            await rt.store.put_user(User("alice", "x", extra={"totp": legacy}))
            await rt.store.put_user(User("bob", "x"))
            await rt.store.put_user(User("carol", "x", extra={"totp": {"secret": foreign, "recovery": []}}))
            assert await seal_stored_factors(rt) == 1
            assert await seal_stored_factors(rt) == 0
            stored = (await rt.store.get_user("alice")).extra
            assert SECRET not in str(stored) and codes and factor.recovery[0] not in str(stored)
            assert totp.Factor.from_extra(stored, rt.sealer, "alice") == factor
            assert (await rt.store.get_user("carol")).extra["totp"]["secret"] == foreign

    asyncio.run(main())
