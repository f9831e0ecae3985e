"""Markers that make a :mod:`tests.chaos.faulty_worker` pool process misbehave when they
appear in an input's bytes, and a valid image that carries one."""

from __future__ import annotations

import io

from PIL import Image, PngImagePlugin

KILL = b"chaos:kill"
SLOW = b"chaos:slow"
HOLD = b"chaos:hold"
HOLD_UPLOAD = b"chaos:hold-upload"


def marked_png(marker: bytes = b"", color: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    """A valid 64×48 PNG whose bytes contain ``marker`` (in a tEXt chunk)."""
    info = PngImagePlugin.PngInfo()
    if marker:
        info.add_text("chaos", marker.decode())
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()
