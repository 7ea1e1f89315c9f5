"""``lapse demo``: one command, a real app behind the real gateway, credentials printed."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ..support import free_port


def test_demo_serves_acme_billing_behind_lapse(tmp_path: Path):
    port, app_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lapse", "demo", "--port", str(port), "--app-port", str(app_port),
         "--state", str(tmp_path / "state")],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        banner = ""
        deadline = time.monotonic() + 20
        while "sign in as" not in banner and time.monotonic() < deadline:
            banner += proc.stderr.readline()
        password = re.search(r"sign in as\s+demo / (\S+)", banner).group(1)
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(base + "/_lapse/healthz", timeout=0.5)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        with httpx.Client(base_url=base) as client:
            first = client.get("/invoices", headers={"accept": "text/html"})
            assert first.status_code == 303 and first.headers["location"].startswith("/_lapse/login?next=/invoices")
            page = client.get(first.headers["location"])
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
            nonce = page.headers["set-cookie"].split(";", 1)[0]
            r = client.post("/_lapse/login", headers={"cookie": nonce},
                            data={"username": "demo", "password": password, "next": "/invoices", "csrf_token": token})
            assert r.status_code == 303 and r.headers["location"] == "/invoices"
            session = r.headers["set-cookie"].split(";", 1)[0]
            invoices = client.get("/invoices", headers={"cookie": session, "accept": "text/html"})
            assert invoices.status_code == 200 and "demo" in invoices.text and "Invoice" in invoices.text
            status = client.get("/_lapse/session?path=/payments", headers={"cookie": session}).json()
            assert status["authenticated"] and status["idle_expires_in"] <= 30
    finally:
        proc.terminate()
        proc.wait(15)
