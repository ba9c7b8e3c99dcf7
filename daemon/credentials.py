"""systemd credentials in `*_file` keys: `credential:NAME` is $CREDENTIALS_DIRECTORY/NAME."""

from __future__ import annotations

import os
from collections.abc import Mapping

PREFIX = "credential:"
ENVIRONMENT = "CREDENTIALS_DIRECTORY"  # set by systemd for a unit with LoadCredential=


class CredentialError(Exception):
    """A `credential:` value that cannot be resolved: the reason, for a ConfigError."""


def is_credential(value: object) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def credential_path(value: str, environ: Mapping[str, str]) -> str:
    """Where `credential:NAME` is: $CREDENTIALS_DIRECTORY/NAME, which must exist. Whether the
    service's user can read it is checked where the file is read, as for any other path."""
    name = value[len(PREFIX) :]
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise CredentialError(f"{value}: a credential name is a file name (credential:NAME)")
    directory = environ.get(ENVIRONMENT)
    if not directory:
        raise CredentialError(
            f"{value} needs ${ENVIRONMENT}, which is not set "
            f"(systemd sets it for a unit with LoadCredential={name}:FILE)"
        )
    path = os.path.join(directory, name)
    if not os.path.lexists(path):
        raise CredentialError(
            f"{value}: no such credential in {directory} "
            f"(the unit needs LoadCredential={name}:FILE)"
        )
    return path
