"""Who may bind where: loopback needs nothing, any other address needs a token (no heavy imports:
``vrex serve --host 0.0.0.0`` without a token must fail at once)."""

from __future__ import annotations

import ipaddress
import secrets

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> str | None:
    """The token to enforce: required off loopback ('auto' generates one); ValueError names --token."""
    if token == "auto":
        return secrets.token_urlsafe(18)
    if token is not None and len(token) < 8:
        raise ValueError("--token must be at least 8 characters (or 'auto' to generate one)")
    if token is None and not is_loopback(host):
        raise ValueError(f"binding {host} (not loopback) needs a token: pass --token SECRET or --token auto "
                         "(clients then send 'Authorization: Bearer SECRET')")
    return token
