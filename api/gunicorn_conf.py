"""gunicorn settings for the API (``gunicorn -c python:api.gunicorn_conf``): a loud warning
at start when it serves without tokens beyond loopback."""

from __future__ import annotations

from api.audit import exposure_warning
from shared.settings import Settings


def when_ready(server) -> None:
    hosts = [
        address[0] if isinstance(address, tuple) else f"unix:{address}"
        for address in server.cfg.address
    ]
    warning = exposure_warning(hosts, Settings())
    if warning:
        server.log.warning(warning)
