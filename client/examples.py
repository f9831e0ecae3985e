"""A batch's dataset examples on the client side (docs/design.md "Dataset examples"): for
every channel of every layer, the items that excite it most, each with its *tile* (the input
with where the channel fires) cut out of the layer's sheets.

    examples = batch.examples()
    layer = examples.layer("layer4.1.conv2")    # or its index
    best = layer.top[7][0]                      # Example(item_id, name, score, rank)
    examples.tile_image(layer, 7, rank=0)  # PIL.Image, 64×64

Sheets are downloaded once per :class:`Examples` (the presigned URLs expire with the API's
PRESIGN_EXPIRY_S: call ``batch.examples()`` again after that).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from PIL import Image

from client.errors import ApiError

if TYPE_CHECKING:
    from client.api import Client


@dataclass(frozen=True)
class Example:
    """One entry of a channel's top list: rank 0 is the best."""

    item_id: str
    name: str
    score: float
    rank: int


@dataclass(frozen=True)
class Picture:
    """Where an example's tile is: its sheet's URL and the box (left, upper, right, lower)."""

    sheet_url: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class ExampleLayer:
    index: int
    name: str
    channels: int
    shape: tuple[int, int, int]
    channel_mean: list[float]
    channel_max: list[float]
    top: list[list[Example]]
    sheets: list[str]
    tile: int
    sheet_channels: int

    def picture(self, channel: int, rank: int) -> Picture:
        """The sheet and box of ``channel``'s example of rank ``rank`` (0 = best)."""
        if not 0 <= channel < self.channels:
            raise IndexError(f"layer {self.name} has channels 0..{self.channels - 1}")
        if not 0 <= rank < len(self.top[channel]):
            raise IndexError(f"channel {channel} has {len(self.top[channel])} examples")
        x, y = self.tile * rank, self.tile * (channel % self.sheet_channels)
        url = self.sheets[channel // self.sheet_channels]
        return Picture(url, (x, y, x + self.tile, y + self.tile))


@dataclass
class Examples:
    """``GET /batches/<id>/examples`` and every layer's full entry."""

    k: int
    score: str
    mode: str
    weights: Any
    precision: Any
    items: int
    tile: int
    sheet_channels: int
    missing: list[int]
    layers: list[ExampleLayer]
    client: Client = field(repr=False)
    _sheets: dict[str, Image.Image] = field(default_factory=dict, repr=False)

    @classmethod
    def fetch(cls, client: Client, batch_id: str) -> Examples:
        """The summary, then each layer; the API's NotFound (run with examples=0) and
        Conflict (not ended yet) come through as they are."""
        summary = client.request("GET", f"/batches/{batch_id}/examples").json()
        layers = [
            _layer(client.request("GET", entry["url"]).json(), summary)
            for entry in summary["layers"]
        ]
        return cls(
            k=summary["k"],
            score=summary["score"],
            mode=summary["mode"],
            weights=summary.get("weights"),
            precision=summary.get("precision"),
            items=summary["items"],
            tile=summary["tile"],
            sheet_channels=summary["sheet_channels"],
            missing=list(summary["missing"]),
            layers=layers,
            client=client,
        )

    def layer(self, which: int | str) -> ExampleLayer:
        """A layer by its index or its name."""
        for layer in self.layers:
            if which in (layer.index, layer.name):
                return layer
        raise KeyError(f"no layer {which!r}: {[layer.name for layer in self.layers]}")

    def sheet(self, url: str) -> Image.Image:
        """A sheet as an RGB image, downloaded once."""
        if url not in self._sheets:
            image = Image.open(io.BytesIO(self.client.fetch(url)))
            self._sheets[url] = image.convert("RGB")
        return self._sheets[url]

    def tile_image(
        self, layer: int | str | ExampleLayer, channel: int, rank: int = 0
    ) -> Image.Image:
        """The tile of ``channel``'s example of rank ``rank`` in ``layer``."""
        entry = layer if isinstance(layer, ExampleLayer) else self.layer(layer)
        picture = entry.picture(channel, rank)
        return self.sheet(picture.sheet_url).crop(picture.box)


def _layer(doc: dict, summary: dict) -> ExampleLayer:
    return ExampleLayer(
        index=doc["index"],
        name=doc["name"],
        channels=doc["channels"],
        shape=tuple(doc["shape"]),
        channel_mean=list(doc["channel_mean"]),
        channel_max=list(doc["channel_max"]),
        top=[
            [Example(e["item_id"], e["name"], e["score"], rank) for rank, e in enumerate(entries)]
            for entries in doc["top"]
        ],
        sheets=list(doc["sheets"]),
        tile=summary["tile"],
        sheet_channels=summary["sheet_channels"],
    )


def download_examples(client: Client, batch: dict, out_dir: str | Path) -> list[Path]:
    """``examples.json`` (the bytes the workers wrote) and every sheet, under ``out_dir`` as
    ``examples.json`` and ``sheets/<LL>-<GGG>.jpg``; ``batch`` is its document."""
    out = Path(out_dir)
    summary = client.request("GET", f"/batches/{batch['id']}/examples").json()
    examples_url = (batch.get("result") or {}).get("examples_url")
    paths = [client.fetch_to(examples_url, out / "examples.json")]
    for layer in summary["layers"]:
        for url in layer["sheets"]:
            name = Path(urlsplit(url).path).name
            if name in ("", ".", ".."):
                raise ApiError(502, "bad_sheet_url", f"a sheet URL names no file: {url}")
            paths.append(client.fetch_to(url, out / "sheets" / name))
    return paths
