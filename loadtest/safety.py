"""The load generator talks to this machine only, unless told otherwise: a target URL must be loopback,
or (``--allow-remote``, a user's own deployment) at least an http(s) URL with a host."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class NotLoopbackError(ValueError):
    """The URL points somewhere other than this machine's loopback interface."""


def require_loopback(url: str) -> str:
    """Return ``url`` unchanged when its host is a loopback address, else raise ``NotLoopbackError``.

    Host names are not resolved (a resolver could answer anything): only literal loopback addresses
    (127.0.0.0/8, ::1) and the name ``localhost`` are accepted.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise NotLoopbackError(f"refusing {url!r}: only http(s) URLs are supported")
    host = parts.hostname
    if not host:
        raise NotLoopbackError(f"refusing {url!r}: no host")
    if host.lower() in LOOPBACK_NAMES:
        return url
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise NotLoopbackError(f"refusing {url!r}: host {host!r} is not a loopback address") from None
    if not address.is_loopback:
        raise NotLoopbackError(f"refusing {url!r}: {host} is not a loopback address (127.0.0.0/8, ::1)")
    return url


def require_http(url: str) -> str:
    """Return ``url`` when it is an http(s) URL with a host (remote targets, explicitly allowed)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotLoopbackError(f"refusing {url!r}: an http(s) URL with a host is needed")
    return url
