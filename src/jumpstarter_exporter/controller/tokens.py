"""Credentials: long-lived bearer tokens for exporters and clients, short-lived router tokens.

Bearer tokens are random and stored only as SHA-256 hashes, so a copy of the state database
lets nobody log in. Router tokens are HS256 JWTs (RFC 7519) with the claims upstream's router
checks (protocol-facts §7.2): ``iss``, ``aud``, ``sub`` = stream id, ``exp``, ``nbf``, ``iat``,
``jti``. Ours live minutes, not upstream's 30, and the router accepts each ``sub`` for one
pairing only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass

ROUTER_ISSUER = "https://jumpstarter.dev/stream"
ROUTER_AUDIENCE = "https://jumpstarter.dev/router"
ROUTER_TOKEN_TTL = 300.0


def new_token(subject: str = "") -> str:
    """A bearer token: opaque to us (looked up by hash), shaped as a JWT (RFC 7519).

    Upstream's ``jmp shell`` decodes the client token as a JWS to read ``exp`` before it
    connects and refuses anything else, so the token has JWT form: a payload naming the
    subject and 256 random bits as the signature. It carries no ``exp``: it is valid until
    the admin deletes the exporter or client (or the client rotates it).
    """
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"iss": "jumpstarter-exporter", "sub": subject, "iat": int(time.time())}
    payload = _b64(json.dumps(claims).encode())
    return f"{header}.{payload}.{_b64(secrets.token_bytes(32))}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenError(Exception):
    """A router token that is malformed, badly signed, expired or for someone else."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class RouterClaims:
    stream_id: str
    expires: float


def mint_router_token(key: bytes, ttl: float = ROUTER_TOKEN_TTL, now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {
        "iss": ROUTER_ISSUER,
        "aud": [ROUTER_AUDIENCE],
        "sub": str(uuid.uuid4()),
        "jti": str(uuid.uuid4()),
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + ttl),
    }
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def verify_router_token(key: bytes, token: str, now: float | None = None) -> RouterClaims:
    now = time.time() if now is None else now
    try:
        header_b64, claims_b64, signature_b64 = token.split(".")
        expected = hmac.new(key, f"{header_b64}.{claims_b64}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(signature_b64)):
            raise TokenError("bad signature")
        header = json.loads(_unb64(header_b64))
        claims = json.loads(_unb64(claims_b64))
    except (ValueError, json.JSONDecodeError) as exc:
        raise TokenError(f"malformed token ({type(exc).__name__})") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenError("malformed token (header or claims not an object)")
    if header.get("alg") != "HS256":
        raise TokenError("unexpected algorithm")
    audience = claims.get("aud", [])
    if not isinstance(audience, list):
        audience = [audience]
    if claims.get("iss") != ROUTER_ISSUER or ROUTER_AUDIENCE not in audience:
        raise TokenError("wrong issuer or audience")
    if not isinstance(claims.get("exp"), int) or claims["exp"] <= now:
        raise TokenError("expired")
    not_before = claims.get("nbf", 0)
    if not isinstance(not_before, int | float):
        raise TokenError("malformed nbf")
    if not_before > now + 5:  # 5 s of clock skew between processes is tolerated
        raise TokenError("not yet valid")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise TokenError("no stream id")
    return RouterClaims(claims["sub"], float(claims["exp"]))
