"""Google OAuth 2.0 token endpoint stand-in: JWT-bearer grants from service accounts."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import tornado.web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from daemon.emulator.keys import public_key_pem

GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
TOKEN_LIFETIME = 3600
# google-auth stamps iat/exp from the real clock; Google tolerates some skew.
CLOCK_SKEW = 60.0


@dataclass
class Grant:
    """What an access token stands for."""

    client_email: str
    scopes: frozenset[str]
    subject: str | None
    expires_at: float  # real time, like the iat/exp it came from


@dataclass
class _Account:
    keys: dict[str, rsa.RSAPublicKey]  # private_key_id -> public key
    allow_subject: bool


class OAuthError(Exception):
    """An error answer of the token endpoint, in Google's words."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class OAuthEmulator:
    """Issues access tokens for registered service accounts and checks them for the APIs.

    Expiry uses real time, not the emulator clock: the client libraries decide
    when to refresh from the real clock, and the two must agree.
    """

    def __init__(self) -> None:
        self._accounts: dict[str, _Account] = {}
        self._tokens: dict[str, Grant] = {}
        self.tokens_issued = 0
        self.requests = 0
        # Failure injection: the next N token requests answer this error.
        self._failures: list[OAuthError] = []
        # A slow token endpoint without a clock: requests wait here until release().
        self._gate: asyncio.Event | None = None
        self.held = 0
        self._arrived = asyncio.Event()

    # -- set-up -------------------------------------------------------------

    def register(self, service_account_info: dict[str, Any], *, allow_subject: bool = True) -> None:
        """Trust a service-account key (by client_email and private_key_id).

        `allow_subject=False` acts as an account without domain-wide delegation:
        a grant naming a `sub` is refused with unauthorized_client, as Google does.
        """
        email = service_account_info["client_email"]
        loaded = serialization.load_pem_public_key(
            public_key_pem(service_account_info).encode("ascii")
        )
        if not isinstance(loaded, rsa.RSAPublicKey):  # pragma: no cover - keys.py writes RSA
            raise ValueError("service account key is not RSA")
        account = self._accounts.setdefault(email, _Account(keys={}, allow_subject=allow_subject))
        account.allow_subject = allow_subject
        account.keys[service_account_info["private_key_id"]] = loaded

    def fail_next(self, count: int, error: str, description: str, status: int = 400) -> None:
        """Answer the next `count` token requests with this error (e.g. 503 server_error)."""
        self._failures.extend(OAuthError(error, description, status) for _ in range(count))

    def hold(self) -> None:
        """Hold every token answer until release()."""
        if self._gate is None:
            self._gate = asyncio.Event()

    def release(self) -> None:
        """Answer the held token requests, and hold no more."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()

    # A timeout argument (ASYNC109) on purpose: a test reads best as one call with its bound.
    async def wait_held(self, count: int = 1, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until `count` token requests are being held."""
        async with asyncio.timeout(timeout):
            while self.held < count:
                await self._arrived.wait()
                self._arrived.clear()

    async def wait_if_held(self) -> None:
        gate = self._gate
        if gate is None:
            return
        self.held += 1
        self._arrived.set()
        try:
            await gate.wait()
        finally:
            self.held -= 1

    def expire_tokens(self) -> None:
        """Make every issued token invalid: the APIs answer 401, the clients refresh."""
        self._tokens.clear()

    # -- the APIs' side -----------------------------------------------------

    def grant(self, authorization_header: str | None) -> Grant | None:
        """The live grant behind `Authorization: Bearer <token>`, or None."""
        if not authorization_header:
            return None
        scheme, _, token = authorization_header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        found = self._tokens.get(token.strip())
        if found is None or found.expires_at <= time.time():
            return None
        return found

    def verify(self, authorization_header: str | None, scope: str) -> bool:
        """True when the bearer token is live and carries `scope` (or cloud-platform)."""
        found = self.grant(authorization_header)
        return found is not None and (scope in found.scopes or CLOUD_PLATFORM in found.scopes)

    # -- the token endpoint ---------------------------------------------------

    def exchange(self, grant_type: str | None, assertion: str | None, own_url: str) -> Grant:
        """Check a JWT-bearer grant; return the grant (not yet given a token) or raise."""
        self.requests += 1
        if self._failures:
            raise self._failures.pop(0)
        if grant_type != JWT_BEARER:
            raise OAuthError("unsupported_grant_type", "Invalid grant_type: " + str(grant_type))
        if not assertion:
            raise OAuthError("invalid_request", "Missing required parameter: assertion")
        claims = self._verify_jwt(assertion, own_url)
        scope = claims.get("scope")
        if not isinstance(scope, str) or not scope.split():
            raise OAuthError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        subject = claims.get("sub")
        if subject is not None and not isinstance(subject, str):
            raise OAuthError("invalid_grant", "Invalid JWT: sub is not a string.")
        if subject and subject != claims["iss"] and not self._accounts[claims["iss"]].allow_subject:
            raise OAuthError(
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, "
                "or client not authorized for any of the scopes requested.",
            )
        return Grant(
            client_email=claims["iss"],
            scopes=frozenset(scope.split()),
            subject=subject or None,
            expires_at=time.time() + TOKEN_LIFETIME,
        )

    def issue(self, found: Grant) -> str:
        token = "ya29.emu-" + secrets.token_urlsafe(32)
        self._tokens[token] = found
        self.tokens_issued += 1
        return token

    def _verify_jwt(self, assertion: str, own_url: str) -> dict[str, Any]:
        parts = assertion.split(".")
        if len(parts) != 3:
            raise OAuthError("invalid_grant", "Invalid JWT: malformed.")
        try:
            header = json.loads(_b64decode(parts[0]))
            claims = json.loads(_b64decode(parts[1]))
            signature = _b64decode(parts[2])
        except (ValueError, binascii.Error) as exc:
            raise OAuthError("invalid_grant", "Invalid JWT: malformed.") from exc
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise OAuthError("invalid_grant", "Invalid JWT: malformed.")
        if header.get("alg") != "RS256":
            raise OAuthError("invalid_grant", "Invalid JWT: unsupported algorithm.")
        account = self._accounts.get(str(claims.get("iss")))
        if account is None:
            raise OAuthError("invalid_grant", "Invalid grant: account not found")
        kid = header.get("kid")
        if kid is not None:
            candidates = [account.keys[kid]] if kid in account.keys else []
        else:
            candidates = list(account.keys.values())
        signed = (parts[0] + "." + parts[1]).encode("ascii")
        for key in candidates:
            try:
                key.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
                break
            except InvalidSignature:
                continue
        else:
            raise OAuthError("invalid_grant", "Invalid JWT Signature.")
        if claims.get("aud") not in (GOOGLE_TOKEN_AUDIENCE, own_url):
            raise OAuthError("invalid_grant", "Invalid JWT: audience is not the token endpoint.")
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if (
            not isinstance(iat, int | float)
            or not isinstance(exp, int | float)
            or exp <= now - CLOCK_SKEW
            or iat > now + CLOCK_SKEW
            or exp - iat > TOKEN_LIFETIME
        ):
            raise OAuthError(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
            )
        return claims

    def routes(self) -> list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]:
        return [(r"/token", TokenHandler, {"oauth": self})]


class TokenHandler(tornado.web.RequestHandler):
    """POST /token, form-encoded, as oauth2.googleapis.com takes it."""

    def initialize(self, oauth: OAuthEmulator) -> None:
        self.oauth = oauth

    def check_xsrf_cookie(self) -> None:  # an API endpoint, not a browser form
        pass

    async def post(self) -> None:
        await self.oauth.wait_if_held()
        own_url = f"{self.request.protocol}://{self.request.host}{self.request.path}"
        try:
            found = self.oauth.exchange(
                self.get_body_argument("grant_type", None),
                self.get_body_argument("assertion", None),
                own_url,
            )
        except OAuthError as exc:
            self.set_status(exc.status)
            self.finish({"error": exc.error, "error_description": exc.description})
            return
        token = self.oauth.issue(found)
        self.set_header("Cache-Control", "no-store")
        self.finish({"access_token": token, "expires_in": TOKEN_LIFETIME, "token_type": "Bearer"})
