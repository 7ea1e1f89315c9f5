"""The packed Redis record: records written before device labels still read; new ones round-trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lapse.core.activity import observe
from lapse.core.session import Session
from lapse.store.redis_codec import Damaged, pack, unpack

T0 = 1_700_000_000.25
SESSION = Session(
    key="00" * 16, user="alice", auth_time=T0, created_at=T0, activity=((0.0, T0), (900.0, T0 + 5)),
    last_seen_at=T0 + 5, expires_at=T0 + 3600, ip="192.0.2.1", mfa=True, groups=("a", "b"),
    stats=observe(None, 5.0, T0 + 5, "/x"),
)
# SESSION as the lapse before device labels packed it (record version 1, with statistics).
VERSION_1 = bytes.fromhex(
    "01010200001040fc54d94100001040fc54d94100005041fc54d941000010c4ff54d9410000000000000000000000000000000000"
    "001040fc54d9410000000000208c4000005041fc54d9410500616c69636509003139322e302e322e31ffff0300611f621e000100"
    "00000000000000001440000000000000000000004000010000002f78"
)


def test_a_version_1_record_still_reads() -> None:
    assert unpack(SESSION.key, VERSION_1) == SESSION


def test_without_a_device_the_record_stays_version_1() -> None:
    """So older replicas, during a rolling upgrade, read every session they could read before."""
    assert pack(SESSION) == VERSION_1


@given(
    device=st.text(max_size=40),
    stats=st.booleans(),
    ended=st.booleans(),
)
def test_a_device_round_trips_with_or_without_statistics(device: str, stats: bool, ended: bool) -> None:
    s = SESSION.with_(device=device, stats=SESSION.stats if stats else None,
                      ended_at=T0 + 9 if ended else None, end_reason="idle" if ended else None)
    blob = pack(s)
    assert blob[0] == 2
    assert unpack(s.key, blob) == s


def test_a_newer_version_or_trailing_bytes_are_refused() -> None:
    with pytest.raises(Damaged, match="version 4"):
        unpack(SESSION.key, b"\x04" + VERSION_1[1:])
    with pytest.raises(Damaged):
        unpack(SESSION.key, pack(SESSION.with_(device="curl")) + b"x")


@given(device=st.none() | st.text(max_size=40), ended=st.booleans())
def test_groups_past_64_kib_are_version_3_and_round_trip(device: str | None, ended: bool) -> None:
    """An IdP's groups claim of thousands of entries: stored (as SQLite stores it), not a ValueError."""
    groups = tuple(f"/org/department-{i:05d}/team" for i in range(2500))  # 67,499 bytes joined
    s = SESSION.with_(groups=groups, device=device, ended_at=T0 + 9 if ended else None,
                      end_reason="idle" if ended else None)
    blob = pack(s)
    assert blob[0] == 3
    assert unpack(s.key, blob) == s
    assert pack(s.with_(groups=groups[:2000]))[0] == (1 if device is None else 2)  # 53,999 bytes: as before
