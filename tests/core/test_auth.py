"""Token verification (§1) and the carriers; no sockets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from service.auth import Identity, Verifier, extract_token, mint
from service.config import Settings
from service.errors import AuthError

SECRET = "s" * 40


def verifier(**env: str) -> Verifier:
    return Verifier(Settings.from_env({"JWT_SECRET": SECRET, **env}))


def refused(v: Verifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        v.verify(token)
    assert info.value.status == 401
    return str(info.value.code)


def test_valid_token_gives_identity() -> None:
    ident = verifier().verify(mint(SECRET, "alice", "d1", ttl=100, rooms=["r1", "team-*"]))
    assert (ident.user_id, ident.device_id) == ("alice", "d1")
    assert abs(ident.expires_at - (time.time() + 100)) < 3
    assert ident.may_join("r1") and ident.may_join("team-9") and not ident.may_join("r2")


def test_refusal_codes() -> None:
    v = verifier()
    now = int(time.time())
    assert refused(v, mint(SECRET, "a", "d", ttl=-10)) == "token_expired"
    assert refused(v, mint(SECRET, "a", "d", ttl=7200)) == "token_lifetime_too_long"
    assert refused(v, mint("t" * 40, "a", "d")) == "invalid_token"
    assert refused(v, "not.a.jwt") == "invalid_token"
    assert refused(v, jwt.encode({"user_id": "a", "device_id": "d"}, SECRET)) == "invalid_token"
    no_dev = jwt.encode({"user_id": "a", "exp": now + 60}, SECRET)
    assert refused(v, no_dev) == "invalid_token"
    assert refused(v, mint(SECRET, "a b", "d")) == "invalid_token"
    assert refused(v, mint(SECRET, "a\n", "d")) == "invalid_token"  # the whole string
    assert refused(v, mint(SECRET, "a", "d\n")) == "invalid_token"
    assert refused(v, mint(SECRET, "a", "d" * 129)) == "invalid_token"
    unsigned = jwt.encode({"user_id": "a", "device_id": "d", "exp": now + 60}, None,
                          algorithm="none")
    assert refused(v, unsigned) == "invalid_token"
    hs512 = jwt.encode({"user_id": "a", "device_id": "d", "exp": now + 60}, SECRET * 2,
                       algorithm="HS512")
    assert refused(v, hs512) == "invalid_token"
    future = mint(SECRET, "a", "d", nbf=now + 100)
    assert refused(v, future) == "invalid_token"


def test_max_token_ttl_and_issuer_audience() -> None:
    v = verifier(MAX_TOKEN_TTL="60", JWT_ISSUER="idp", JWT_AUDIENCE="sig")
    assert refused(v, mint(SECRET, "a", "d", ttl=50)) == "invalid_token"  # no iss/aud
    assert refused(v, mint(SECRET, "a", "d", ttl=50, iss="other", aud="sig")) == "invalid_token"
    assert refused(v, mint(SECRET, "a", "d", ttl=120, iss="idp", aud="sig")) == (
        "token_lifetime_too_long"
    )
    assert isinstance(v.verify(mint(SECRET, "a", "d", ttl=50, iss="idp", aud="sig")), Identity)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_public_key_algorithms(tmp_path: Path, alg: str) -> None:
    private: object
    if alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    pub_pem = private.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    priv_pem = private.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "pub.pem").write_bytes(pub_pem)
    v = Verifier(Settings.from_env({"JWT_PUBLIC_KEY": str(tmp_path / "pub.pem")}))
    assert v.verify(mint(priv_pem.decode(), "u", "d", algorithm=alg)).user_id == "u"
    # key confusion: HS256 "signed" with the public key text must not pass
    now = int(time.time())
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(
        b'{"user_id":"u","device_id":"d","exp":%d}' % (now + 60)
    )
    mac = hmac.new(pub_pem, signing_input, hashlib.sha256).digest()
    forged = (signing_input + b"." + b64(mac)).decode()
    assert refused(v, forged) == "invalid_token"


def test_extract_token_carriers_first_found_wins() -> None:
    assert extract_token("q", "Bearer h", "signaling.v1, bearer.p") == "q"
    assert extract_token("", "Bearer h", "signaling.v1, bearer.p") == "h"
    assert extract_token(None, "bearer h", None) == "h"
    assert extract_token(None, "Basic zzz", "signaling.v1, bearer.p") == "p"
    assert extract_token(None, "Bearer ", "signaling.v1") is None
    assert extract_token(None, None, "bearer.") is None
