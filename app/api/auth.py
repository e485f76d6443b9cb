"""API keys as bearer tokens, stored only as SHA-256 digests.

``REALIGN_API_KEYS`` holds ``[{"name", "role", "sha256"}]``; a presented token is
hashed and compared with every stored digest in constant time. With no keys
configured every caller is the local admin, which is only allowed on loopback:
:func:`check_bind` refuses any other interface at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from app.core.errors import AuthenticationError, UnsafeSettingsError
from app.core.settings import Settings
from app.jobs.models import Caller

log = logging.getLogger("app.api")

LOCAL_ADMIN = Caller(name="local", role="admin")


class ApiKeyEntry(BaseModel):
    """One configured key: who it is, what it may do, and the digest of the secret."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[\w.@-]+$")
    role: Literal["user", "admin"] = "user"
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


_ENTRIES = TypeAdapter(list[ApiKeyEntry])


def hash_key(token: str) -> str:
    """Hex SHA-256 of an API key: what ``REALIGN_API_KEYS`` stores instead of the key."""
    return hashlib.sha256(token.encode()).hexdigest()


class KeyRing:
    """The configured API keys; ``authenticate`` turns a bearer token into a Caller."""

    def __init__(self, entries: list[ApiKeyEntry]) -> None:
        self._entries = [(bytes.fromhex(e.sha256), e) for e in entries]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Parse ``settings.api_keys``.

        Raises:
            UnsafeSettingsError: the JSON is malformed or names a key twice.
        """
        if not settings.api_keys or not settings.api_keys.strip():
            return cls([])
        try:
            entries = _ENTRIES.validate_python(json.loads(settings.api_keys))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise UnsafeSettingsError(
                "REALIGN_API_KEYS must be a JSON list of "
                '{"name": ..., "role": "user"|"admin", "sha256": <64 hex>}: '
                f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}"
            ) from None
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise UnsafeSettingsError("REALIGN_API_KEYS names a key twice; names must be unique")
        return cls(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def authenticate(self, token: str | None) -> Caller:
        """The caller a bearer token belongs to (the local admin when auth is off).

        Raises:
            AuthenticationError: auth is on and the token is missing or unknown.
        """
        if not self._entries:
            return LOCAL_ADMIN
        if not token:
            raise AuthenticationError("No API key given: send it as 'Authorization: Bearer <key>'.")
        digest = hashlib.sha256(token.encode()).digest()
        found: ApiKeyEntry | None = None
        for stored, entry in self._entries:  # no early exit: timing does not reveal position
            if hmac.compare_digest(stored, digest):
                found = entry
        if found is None:
            raise AuthenticationError("Incorrect API key provided.")
        return Caller(name=found.name, role=found.role)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """Refuse to serve without API keys on anything but loopback.

    Raises:
        UnsafeSettingsError: ``host`` is not loopback and no API keys are configured,
            or the keys are malformed.
    """
    if KeyRing.from_settings(settings).enabled:
        return
    if not is_loopback(settings.host):
        raise UnsafeSettingsError(
            f"Refusing to serve on {settings.host!r} without API keys: every caller would be "
            "an admin. Set REALIGN_API_KEYS (JSON list of {name, role, sha256}) or bind "
            "REALIGN_HOST=127.0.0.1."
        )
    log.warning("auth is off (no REALIGN_API_KEYS): every caller on %s is an admin", settings.host)
