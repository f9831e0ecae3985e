"""The API's audit trail: one log line per accepted submission, naming the token (never the
token itself), the record, its size and its source, and a loud warning when the API is
reachable beyond this machine without tokens."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from shared.settings import Settings

log = logging.getLogger("featuremaps.audit")


def init_audit_log() -> None:
    """Send audit lines to stderr (gunicorn's error log, the container's log) at INFO, whatever
    the root logger's level; idempotent across app instances in one process."""
    if log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def record_submission(kind: str, record_id: str, owner: str, size: int | None, source: str) -> None:
    # The source holds a client's file name or URL: escaped, it cannot forge a second line.
    source = source.encode("unicode_escape").decode("ascii")
    log.info(
        "accepted %s id=%s token=%s size=%s source=%s",
        kind,
        record_id,
        owner or "-",
        "-" if size is None else size,
        source,
    )


def exposure_warning(hosts: Iterable[str], settings: Settings) -> str | None:
    """The warning to give when the API serves without tokens on a non-loopback host
    (``hosts``: the addresses it binds, ``unix:…`` for a socket)."""
    if settings.token_table:
        return None
    exposed = [host for host in hosts if not _is_loopback(host)]
    if not exposed:
        return None
    return (
        f"SECURITY WARNING: the API listens on {', '.join(exposed)} with no tokens: anyone who "
        "can reach it may submit work and read every result. Set FEATUREMAPS_API_TOKENS_FILE "
        "(or FEATUREMAPS_API_TOKENS), or bind to 127.0.0.1."
    )


def _is_loopback(host: str) -> bool:
    if host.startswith("unix:") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
