"""`signaling-server --cert F --key F` serves wss:// with the given certificate."""

from __future__ import annotations

import datetime
import json
import ssl
from pathlib import Path

import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import server_env, start_server, token

pytestmark = pytest.mark.e2e


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_wss_with_cert_and_key_flags(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = start_server(
        server_env(), cli=True, extra_args=["-cert", str(cert), "-key", str(key)],
        wait_ready=False, probe_scheme="https",
    )
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        url = f"wss://localhost:{server.port}/ws?token={token('tls', 'd1')}"
        async with websockets.connect(url, ssl=ctx) as ws:
            welcome = json.loads(await ws.recv())
            assert welcome["type"] == "welcome" and welcome["user_id"] == "tls"
            await ws.send('{"type":"ping","id":"p"}')
            assert json.loads(await ws.recv())["type"] == "pong"
    finally:
        server.stop()
