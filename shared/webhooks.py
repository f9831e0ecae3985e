"""Webhooks (docs/design.md "Webhooks"): what the API and the workers share about them.

A job or batch submitted with a ``callback_url`` is POSTed its status document when it
reaches a final state. This module holds the parts both sides need:

- :func:`check_callback_url`: the URL's rules, and the SSRF guard — the host is resolved
  and every address it resolves to must be public, unless ``WEBHOOK_ALLOW_PRIVATE``. The
  API checks at submission (400 ``callback_url_refused``); the deliverer checks again and
  connects to the address it checked, so a name that re-resolves elsewhere later (DNS
  rebinding) reaches nothing private.
- the **outbox**, a Redis sorted set of record keys (``featuremaps:<kind>:<id>``) scored by
  the time of the next attempt. :data:`ENQUEUE_LUA` is the piece of Lua the final status
  transitions run, so a record with a callback enters the outbox in the same step that ends
  it (once: the record's ``callback_state`` is set to ``pending`` with HSETNX).
- :func:`signature`: ``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``, the
  way Stripe signs, sent as ``X-Featuremaps-Signature``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from shared.errors import CallbackRefused
from shared.records import PREFIX
from shared.settings import Settings

CALLBACK_FIELD = "callback_url"
SIGNATURE_HEADER = "X-Featuremaps-Signature"
OUTBOX_KEY = f"{PREFIX}:webhooks:outbox"
MAX_URL_LENGTH = 2048

PENDING = "pending"
DELIVERED = "delivered"
GAVE_UP = "failed"

# A Lua function for the final transitions: put the record at ``key`` in the outbox, due
# now, when it has a callback and was never put there before.
ENQUEUE_LUA = """
local function enqueue_callback(key, outbox)
  if redis.call('HEXISTS', key, 'callback_url') == 1
      and redis.call('HSETNX', key, 'callback_state', 'pending') == 1 then
    local t = redis.call('TIME')
    redis.call('ZADD', outbox, tonumber(t[1]) + tonumber(t[2]) / 1000000, key)
  end
end
"""
# The same as a script of its own: KEYS[1] record, KEYS[2] outbox.
ENQUEUE_SCRIPT = ENQUEUE_LUA + "enqueue_callback(KEYS[1], KEYS[2])\nreturn 1\n"


@dataclass(frozen=True)
class Target:
    """A checked callback URL: where to connect (``address``), and what to say (``host``
    for the Host header and TLS, ``path`` with its query)."""

    scheme: str
    host: str
    port: int
    path: str
    address: str


def signature(secret: str, timestamp: int, body: bytes) -> str:
    signed = str(timestamp).encode() + b"." + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def accepted_callback_url(raw: object, settings: Settings) -> str | None:
    """A submission's ``callback_url`` once it may be called back (None when absent or
    empty); :class:`CallbackRefused` otherwise."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise CallbackRefused("callback_url must be a string")
    if not settings.webhook_secret:
        raise CallbackRefused(
            "this deployment sends no callbacks (FEATUREMAPS_WEBHOOK_SECRET is not set); "
            "leave callback_url out and poll the status instead"
        )
    url = raw.strip()
    check_callback_url(url, allow_private=settings.webhook_allow_private)
    return url


def check_callback_url(url: str, *, allow_private: bool) -> Target:
    """The URL's target once it passes the rules; :class:`CallbackRefused` saying which rule
    it broke otherwise."""
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"callback_url is over {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise CallbackRefused(f"callback_url {url!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused(f"callback_url {url!r} must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("callback_url may not hold credentials; check the signature instead")
    address = _public_address(parts.hostname, port, allow_private=allow_private)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, port, path, address)


def _public_address(host: str, port: int, *, allow_private: bool) -> str:
    """The first address ``host`` resolves to, once every one of them may be called."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise CallbackRefused(f"callback_url host {host!r} does not resolve: {exc}") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not allow_private:
        for address in addresses:
            if not _is_public(ipaddress.ip_address(address.split("%", 1)[0])):
                raise CallbackRefused(
                    f"callback_url host {host!r} resolves to {address}, a loopback, private, "
                    "link-local or reserved address; callbacks go to public addresses only "
                    "(operators: FEATUREMAPS_WEBHOOK_ALLOW_PRIVATE)"
                )
    return addresses[0]


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return ip.is_global and not ip.is_multicast
