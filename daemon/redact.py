"""Secrets out of log text: the configured ones, tokens in paths and queries, key material."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from daemon.configfile import LoadedConfig

REDACTED = "[redacted]"
# Configured secrets this short are replaced only where they stand alone (not inside a longer
# word): replacing every "t2" of a line would leave it unreadable and tell nothing.
SHORT_SECRET = 12
SECRETS_MAX = 10_000  # a bound on what the redactor remembers (a config holds a few dozen)
_RUN_CHARS = r"A-Za-z0-9_\-"

# A token in a path (`/v1/rooms/{id}/tokens/{token}`), whatever it looks like.
_PATH_TOKEN = re.compile(r"(/tokens/)([^/?#\s\"'\\]+)")
# Query parameters and headers that carry credentials, should a URL or a request end up in text.
_QUERY_SECRET = re.compile(
    r"(?i)\b((?:access_token|firebase_token|token|api_key|key|password)=)([^&\s\"'\\]+)"
)
_AUTHORIZATION = re.compile(r"(?i)\b(bearer|basic)(\s+)([A-Za-z0-9\-._~+/]{8,}=*)")
# A PEM block, with real line breaks or the "\n" of a repr.
_PEM = re.compile(
    r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S
)
# Anything else that looks like a random token (FCM registration tokens, channel tokens): a long
# run of base64url characters mixing letter cases and digits. Not a calendar id's local part
# (followed by "@" or "%40"), which operators need to read.
_LONG_RUN = re.compile(rf"(?<![{_RUN_CHARS}])[{_RUN_CHARS}]{{40,}}(?![{_RUN_CHARS}@]|%40)")


def short(token: str) -> str:
    """The last 8 characters: enough to tell tokens apart, never the secret."""
    return "…" + token[-8:] if len(token) > 8 else "…"


def path_tokens(path: str) -> list[str]:
    """The tokens a request path names (`.../tokens/{token}`), percent-decoded."""
    return [unquote(m[2]) for m in _PATH_TOKEN.finditer(path)]


def _looks_random(run: str) -> bool:
    kinds = (
        any(c.isdigit() for c in run),
        any(c.isupper() for c in run),
        any(c.islower() for c in run),
    )
    return sum(kinds) >= 2


class Redactor:
    """Shortens or removes every secret it knows, and everything shaped like one, from text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: dict[str, None] = {}  # oldest first
        self._pattern: re.Pattern[str] | None = None
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Remember more secrets (API keys, tokens, key material); empty ones are ignored. The
        ones known already stay (a reload adds the new ones: a line logged later may still name
        an old key); past SECRETS_MAX the oldest are forgotten, never the new ones."""
        new = [s for s in dict.fromkeys(secrets) if s and s.strip() and s not in self._secrets]
        if not new:
            return
        self._secrets.update(dict.fromkeys(new[-SECRETS_MAX:]))
        for old in list(self._secrets)[: max(0, len(self._secrets) - SECRETS_MAX)]:
            del self._secrets[old]
        alternatives = []
        for secret in sorted(self._secrets, key=len, reverse=True):
            escaped = re.escape(secret)
            if len(secret) < SHORT_SECRET:
                escaped = rf"(?<![{_RUN_CHARS}]){escaped}(?![{_RUN_CHARS}])"
            alternatives.append(escaped)
        self._pattern = re.compile("|".join(alternatives))

    def text(self, text: str, tokens: Iterable[str] = ()) -> str:
        """`text` with the known secrets removed, `tokens` (a request's own) shortened, and
        anything shaped like a token shortened."""
        text = _PEM.sub(REDACTED, text)
        if self._pattern is not None:
            text = self._pattern.sub(REDACTED, text)
        for token in sorted({t for t in tokens if t}, key=len, reverse=True):
            text = text.replace(token, short(token))
        text = _PATH_TOKEN.sub(lambda m: m[1] + short(m[2]), text)
        text = _QUERY_SECRET.sub(lambda m: m[1] + short(m[2]), text)
        text = _AUTHORIZATION.sub(lambda m: m[1] + m[2] + REDACTED, text)
        return _LONG_RUN.sub(lambda m: short(m[0]) if _looks_random(m[0]) else m[0], text)

    def value(self, value: Any, tokens: Iterable[str] = ()) -> Any:
        """A log field with every string in it redacted (other objects as their str())."""
        if isinstance(value, str):
            return self.text(value, tokens)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {self.text(str(k), tokens): self.value(v, tokens) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(member, tokens) for member in value]
        return self.text(str(value), tokens)


def key_file_secrets(path: str | None) -> list[str]:
    """The private key of a service-account key file, whole and line by line (a traceback may
    show it either way). Nothing when the file cannot be read: its user reports that."""
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as stream:
            info = json.load(stream)
    except (OSError, ValueError):
        return []
    pem = info.get("private_key") if isinstance(info, dict) else None
    if not isinstance(pem, str):
        return []
    body = [line.strip() for line in pem.splitlines() if line.strip() and "-----" not in line]
    return [pem, pem.replace("\n", "\\n"), *body, str(info.get("private_key_id") or "")]


def url_password(url: str | None) -> list[str]:
    """The password in a URL's user-info (a MongoDB URI may hold one)."""
    if not url:
        return []
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [password] if password else []


def configured_secrets(loaded: LoadedConfig) -> list[str]:
    """Every secret a configuration holds or names: API keys, subscriber, metrics and backend
    tokens, the key files' private keys, passwords in storage and backend URLs."""
    config, secrets = loaded.config, loaded.secrets
    return [
        *secrets.api_keys,
        *(subscriber.token for subscriber in secrets.subscribers),
        *(t for t in (secrets.metrics_token, secrets.backend_token) if t),
        *key_file_secrets(config.google.service_account_file),
        *key_file_secrets(config.fcm.service_account_file),
        *url_password(config.storage.url),
        *url_password(config.backend.url),
    ]
