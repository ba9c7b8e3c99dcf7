"""Service-account key files for the emulator: a fresh RSA key in Google's JSON key format."""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def write_service_account(
    path: str | os.PathLike[str],
    *,
    token_uri: str,
    client_email: str,
    project_id: str,
) -> dict[str, Any]:
    """Write a new service-account key file (mode 0600) and return its content.

    The file has every field of a key downloaded from the Cloud console, so
    google-auth and firebase-admin load it unchanged; `token_uri` is where
    google-auth asks for tokens, which is how the emulator gets the calls.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    ).decode("ascii")
    info: dict[str, Any] = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": private_pem,
        "client_email": client_email,
        "client_id": str(10**20 + secrets.randbelow(9 * 10**20)),  # 21 digits, like Google's
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
        + client_email.replace("@", "%40"),
        "universe_domain": "googleapis.com",
    }
    write_key_info(path, info)
    return info


def write_key_info(path: str | os.PathLike[str], info: dict[str, Any]) -> None:
    """Write a key file's content, replacing the file at once (a reader never sees half)."""
    temporary = f"{os.fspath(path)}.tmp"
    # Created 0600 from the start: a private key must never be readable by others,
    # not even for the moment between open() and chmod().
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(info, out, indent=2)
        out.write("\n")
    os.chmod(temporary, 0o600)  # O_CREAT's mode does not apply when the file already existed
    os.replace(temporary, path)


def read_key_info(path: str | os.PathLike[str], client_email: str) -> dict[str, Any] | None:
    """A key file written for `client_email` earlier, or None (absent, not ours, damaged)."""
    try:
        with open(path, encoding="utf-8") as stream:
            info = json.load(stream)
        if not isinstance(info, dict) or info.get("client_email") != client_email:
            return None
        public_key_pem(info)  # the private key still parses
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def public_key_pem(info: dict[str, Any]) -> str:
    """The PEM public key matching a service-account key's private key."""
    private = serialization.load_pem_private_key(info["private_key"].encode("ascii"), None)
    return (
        private.public_key()
        .public_bytes(
            encoding=serialization.Encoding.PEM,
            format=serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        .decode("ascii")
    )
