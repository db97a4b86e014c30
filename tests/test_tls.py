"""TLS served by hypercorn (`--certfile/--keyfile`) with authentication, on a real server."""

from __future__ import annotations

import datetime
import ipaddress
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.liveserver import start

pytestmark = pytest.mark.db


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


def test_tls_with_api_keys(tmp_path: Path, clean_db: str) -> None:
    certfile, keyfile = self_signed(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "dicomweb_server", "apikey", "create", "--role", "read",
         "--database-url", clean_db],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    token = out.stdout.split()[-1]
    args = ("--auth", "apikey", "--certfile", str(certfile), "--keyfile", str(keyfile))
    server = start(tmp_path / "data", clean_db, extra_args=args, scheme="https")
    try:
        trusted = ssl.create_default_context(cafile=str(certfile))
        with httpx.Client(verify=trusted, timeout=30) as client:
            r = client.get(f"{server.url}/studies", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 204
            assert client.get(f"{server.url}/studies").status_code == 401
        # The certificate is checked: an untrusting client refuses it ...
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{server.url}/studies", timeout=30)
        # ... and plain HTTP gets no answer on the TLS port.
        plain = server.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{plain}/studies", timeout=10)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=30)
