"""Certificates for the TLS tests, made with ``openssl`` in the test's own folder (Redis, PostgreSQL).

A missing ``openssl`` skips locally and fails under ``CI=true`` (``support.missing``).
"""

from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .support import missing


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path


def certificate(folder: Path, name: str, *, signed_by: Certificate | None = None,
                names: str | None = "IP:127.0.0.1") -> Certificate:
    """A key and a certificate for ``names`` (a subjectAltName value, e.g. ``"DNS:db.test,IP:127.0.0.1"``), made
    with ``openssl``: self-signed (a certificate that is its own CA, so it can also be one: ``ssl_ca_certs`` or
    ``--tls-ca-cert-file``) or signed by ``signed_by``. ``names=None``: no subjectAltName, only the
    subject's CN (``name``), which TLS clients must not accept as the host name."""
    if shutil.which("openssl") is None:
        missing("openssl is not installed (scripts/test.sh installs it with apt)")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    common = ["-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-subj", f"/CN={name}"]
    if signed_by is None:
        san = [] if names is None else ["-addext", f"subjectAltName={names}"]
        steps = [["openssl", "req", "-x509", *common, "-out", str(cert), "-days", "1", *san]]
    else:
        request, extensions = folder / f"{name}.csr", folder / f"{name}.ext"
        extensions.write_text("basicConstraints=CA:FALSE\n" + ("" if names is None else f"subjectAltName={names}\n"))
        steps = [["openssl", "req", "-new", *common, "-out", str(request)],
                 ["openssl", "x509", "-req", "-in", str(request), "-CA", str(signed_by.cert), "-CAkey",
                  str(signed_by.key), "-set_serial", str(random.getrandbits(63)), "-days", "1",
                  "-extfile", str(extensions), "-out", str(cert)]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
    return Certificate(cert, key)
