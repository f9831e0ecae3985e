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
- **item callbacks** of a batch submitted with ``item_callbacks=true``: each item's final
  state enters the outbox as ``featuremaps:batch:<id>:item:<item id>`` inside the batch
  script that ends the item (:data:`ITEM_ENQUEUE_LUA`), at the batch's next free slot, so a
  batch's item calls are scheduled ``1 / WEBHOOK_ITEM_RATE`` s apart (the spacing is kept
  on the batch as ``item_callback_spacing_s``, the next free slot as ``item_callback_next``).
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

from shared.errors import CallbackRefused, MissingField
from shared.options import parse_bool
from shared.records import PREFIX
from shared.settings import Settings

CALLBACK_FIELD = "callback_url"
ITEM_CALLBACKS_FIELD = "item_callbacks"
SIGNATURE_HEADER = "X-Featuremaps-Signature"
# What a call is about: ``job``, ``batch`` (a batch's own final call) or ``item``.
EVENT_HEADER = "X-Featuremaps-Event"
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

# Lua for the batch scripts (shared/batches.py): ``next_item_slot(batch, now)`` takes the
# batch's next free slot for an item call (no earlier than ``now``) and moves it one spacing
# on; ``enqueue_item_callback(batch, outbox, id)`` puts the item's call there, when the batch
# asked for item calls. Every item reaches a final state once, in one script: it enters once.
ITEM_ENQUEUE_LUA = """
local function next_item_slot(batch, now)
  local spacing = tonumber(redis.call('HGET', batch, 'item_callback_spacing_s') or '')
  local slot = tonumber(redis.call('HGET', batch, 'item_callback_next') or '') or now
  if slot < now then slot = now end
  redis.call('HSET', batch, 'item_callback_next', slot + spacing)
  return slot
end
local function enqueue_item_callback(batch, outbox, id)
  if redis.call('HEXISTS', batch, 'item_callback_spacing_s') == 0 then return end
  local t = redis.call('TIME')
  local slot = next_item_slot(batch, tonumber(t[1]) + tonumber(t[2]) / 1000000)
  redis.call('ZADD', outbox, 'NX', slot, batch .. ':item:' .. id)
end
"""


def item_entry(batch_key: str, item_id: str) -> str:
    """The outbox entry of an item's call (as :data:`ITEM_ENQUEUE_LUA` names it)."""
    return f"{batch_key}:item:{item_id}"


def split_item_entry(entry: str) -> tuple[str, str] | None:
    """``(batch key, item id)`` of an item entry; None for a record's own entry."""
    batch_key, marker, item_id = entry.partition(":item:")
    return (batch_key, item_id) if marker else None


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


def accepted_item_callbacks(raw: object, callback_url: str | None, settings: Settings) -> float:
    """The spacing in seconds of a batch's item calls when it asked for them
    (``item_callbacks=true``), else 0; :class:`InvalidOption` for a value that is not a
    boolean, :class:`MissingField` without a ``callback_url`` to call."""
    if raw is None or raw == "" or not parse_bool(ITEM_CALLBACKS_FIELD, raw):
        return 0.0
    if callback_url is None:
        raise MissingField(
            "item_callbacks=true needs a callback_url: item calls go to the batch's "
            "callback_url; add one, or leave item_callbacks out"
        )
    return 1.0 / settings.webhook_item_rate


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
