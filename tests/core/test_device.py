"""The device label: real User-Agents read as a person would name them; any header gives a short, known label."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lapse.core.device import (
    BROWSERS,
    MAX_LEN,
    POSTGRES_CLIENT,
    SYSTEMS,
    TOOLS,
    UNKNOWN,
    from_application_name,
    from_user_agent,
)

REAL = [
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
     "Chrome on Linux"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
     "Safari/537.36 Edg/124.0.2478.51", "Edge on Windows"),
    ("Mozilla/5.0 (Android 14; Mobile; rv:125.0) Gecko/125.0 Firefox/125.0", "Firefox on Android"),
    ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0", "Firefox on Linux"),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4.1 "
     "Safari/605.1.15", "Safari on macOS"),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.4 Mobile/15E148 Safari/604.1", "Safari on iOS"),
    ("Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) CriOS/124.0.6367.88 "
     "Mobile/15E148 Safari/604.1", "Chrome on iOS"),
    ("Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Mobile "
     "Safari/537.36", "Chrome on Android"),
    ("Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/24.0 "
     "Chrome/117.0.0.0 Mobile Safari/537.36", "Samsung Internet on Android"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/123.0.0.0 "
     "Safari/537.36 OPR/109.0.0.0", "Opera on Windows"),
    ("Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 "
     "Safari/537.36", "Chrome on ChromeOS"),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chromium/122.0 Chrome/122.0 "
     "Safari/537.36", "Chromium on Linux"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64)", "Windows device"),
    ("curl/8.5.0", "curl"),
    ("Wget/1.21.4", "Wget"),
    ("python-requests/2.31.0", "Python requests"),
    ("python-httpx/0.27.0", "Python httpx"),
    ("Go-http-client/2.0", "Go HTTP client"),
    ("HTTPie/3.2.2", "HTTPie"),
    ("PostmanRuntime/7.37.3", "Postman"),
    ("okhttp/4.12.0", "OkHttp"),
    ("", UNKNOWN),
    (None, UNKNOWN),
    ("my-own-script", UNKNOWN),
]


@pytest.mark.parametrize(("ua", "label"), REAL)
def test_real_user_agents(ua: str | None, label: str) -> None:
    assert from_user_agent(ua) == label


def _vocabulary() -> frozenset[str]:
    browsers, systems = [b for b, _ in BROWSERS], [s for s, _ in SYSTEMS]
    return frozenset([tool for _, tool in TOOLS] + browsers + [f"{s} device" for s in systems]
                     + [f"{b} on {s}" for b in browsers for s in systems] + [UNKNOWN])


def test_every_label_fits() -> None:
    assert max(len(label) for label in _vocabulary()) <= MAX_LEN


@given(st.text(max_size=2000))
def test_any_header_gives_a_known_label_never_the_header(ua: str) -> None:
    assert from_user_agent(ua) in _vocabulary()


@given(st.text(alphabet="0123456789._ ;()", max_size=60), st.sampled_from(REAL))
def test_versions_and_build_noise_do_not_change_the_label(noise: str, real: tuple[str | None, str]) -> None:
    ua, label = real
    assert from_user_agent((ua or "") + " " + noise) == label


@given(st.text(max_size=500))
def test_application_name_is_short_printable_and_never_empty(name: str) -> None:
    label = from_application_name(name)
    assert 0 < len(label) <= MAX_LEN
    assert label.isprintable() and label == label.strip()
    assert label == POSTGRES_CLIENT or set(label) <= set(name) | {" "}  # only the client's own characters


def test_application_names() -> None:
    assert from_application_name("psql") == "psql"
    assert from_application_name("DBeaver 23.1.0 - Main\n") == "DBeaver 23.1.0 - Main"
    assert from_application_name(None) == from_application_name("  \t") == POSTGRES_CLIENT
    assert from_application_name("x" * 100) == "x" * MAX_LEN
    assert from_application_name("a\x1b[31mb") == "a [31mb"
