"""Pure rendering: feature maps in, encoded figure bytes out.

The figure is the article's grid: 4 columns, one tile per layer, each tile titled with its
qualified layer name and C×H×W, and a caption that names the weights. Two renderers draw it:

- ``fast`` (default, raster formats): numpy and Pillow. The colormap is a 256-entry lookup
  table taken once from matplotlib; tiles are resized with Pillow; titles are drawn with a
  TrueType font that ships with matplotlib. Tens of milliseconds instead of seconds.
- ``matplotlib``: a real matplotlib figure through the object API (``Figure`` + Agg canvas,
  never pyplot, which keeps figures alive in long-running processes). SVG and PDF always go
  this way.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from shared.options import DEFAULTS, FORMATS, RENDERERS

COLUMNS = 4
TILE = 224  # tile side in pixels; every map is scaled (nearest) to it
PAD = 12
TITLE_HEIGHT = 40
FONT_SIZE = 15
CAPTION_FONT_SIZE = 16
CAPTION_LINE_HEIGHT = 22
LAYER_PNG_MIN_SIDE = 224
# What fits above a tile of the matplotlib grid at its title's font size.
MATPLOTLIB_TITLE_CHARS = 32
# Thumbnails: the grid's tiles without titles or caption, small enough that a gallery page of
# them costs what one figure does.
THUMBNAIL_TILE = 56
THUMBNAIL_PAD = 2
# The input as analysed (upright, RGB), for a page to show beside the figure.
INPUT_PREVIEW_SIDE = 640

_PIL_SAVE = {
    "jpg": ("JPEG", {"quality": 90}),
    # compress_level 1: several times faster than the default 6, files ~20% bigger.
    "png": ("PNG", {"compress_level": 1}),
    "webp": ("WEBP", {"quality": 90, "method": 2}),
}


@dataclass(frozen=True)
class LayerMap:
    """One layer's reduced map and the shape [C, H, W] of the activation it came from."""

    name: str
    shape: tuple[int, int, int]
    map: np.ndarray
    # colormap name -> the map coloured at its own size (:func:`_colored`): the figure and the
    # thumbnail both scale the same one.
    _colored: dict[str, Image.Image] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )


@dataclass(frozen=True)
class GridLayout:
    rows: int
    cols: int
    width: int
    # height of the tile area; the caption band below it grows with the caption's length
    grid_height: int

    def tile_origin(self, index: int) -> tuple[int, int]:
        """Top-left pixel of the image part (below the title) of tile ``index``."""
        row, col = divmod(index, self.cols)
        return PAD + col * (TILE + PAD), PAD + row * (TITLE_HEIGHT + TILE + PAD) + TITLE_HEIGHT


def grid_layout(n_layers: int) -> GridLayout:
    rows = max(1, math.ceil(n_layers / COLUMNS))
    return GridLayout(
        rows=rows,
        cols=COLUMNS,
        width=PAD + COLUMNS * (TILE + PAD),
        grid_height=PAD + rows * (TITLE_HEIGHT + TILE + PAD),
    )


def render_grid(
    layers: Sequence[LayerMap],
    *,
    fmt: str = DEFAULTS.format,
    colormap: str = DEFAULTS.colormap,
    renderer: str = DEFAULTS.renderer,
    caption: str,
) -> bytes:
    """Draw the grid of ``layers`` and encode it as ``fmt``: :func:`encode_grid` of
    :func:`draw_grid`, which a caller that times drawing and encoding apart calls itself."""
    drawn = draw_grid(layers, fmt=fmt, colormap=colormap, renderer=renderer, caption=caption)
    return encode_grid(drawn, fmt)


def draw_grid(
    layers: Sequence[LayerMap],
    *,
    fmt: str = DEFAULTS.format,
    colormap: str = DEFAULTS.colormap,
    renderer: str = DEFAULTS.renderer,
    caption: str,
) -> Image.Image | Figure:
    """Draw the grid of ``layers`` for :func:`encode_grid`: a Pillow image (the ``fast``
    renderer, raster formats) or a matplotlib figure (``matplotlib``, SVG and PDF)."""
    if renderer == "fast" and fmt in _PIL_SAVE:
        return _draw_fast(layers, colormap, caption)
    if renderer not in RENDERERS or fmt not in FORMATS:
        raise ValueError(f"cannot render format {fmt!r} with renderer {renderer!r}")
    return _draw_matplotlib(layers, colormap, caption)


def encode_grid(drawn: Image.Image | Figure, fmt: str) -> bytes:
    """Encode what :func:`draw_grid` drew as ``fmt``."""
    if isinstance(drawn, Image.Image):
        return _encode_pil(drawn, fmt)
    try:
        return _encode_matplotlib(drawn, fmt)
    finally:
        # Break the figure's reference cycles now rather than at the next GC pass.
        drawn.clear()


def render_layer_png(array: np.ndarray, colormap: str = DEFAULTS.colormap) -> bytes:
    """One map as a colormapped PNG, scaled up by a whole factor (nearest) so small maps are
    visible; pixels stay square and unblended."""
    height, width = array.shape
    factor = max(1, math.ceil(LAYER_PNG_MIN_SIDE / min(height, width)))
    # A palette PNG: the map's colours exactly, in a third of the bytes of RGB.
    return _encode_pil(_colormapped(array, (width * factor, height * factor), colormap), "png")


def render_thumbnail(layers: Sequence[LayerMap], colormap: str = DEFAULTS.colormap) -> bytes:
    """A small JPEG of the grid (4 columns of untitled tiles) for galleries, whatever the
    figure's format: a browser should never scale a full figure down to show a thumbnail."""
    rows = max(1, math.ceil(len(layers) / COLUMNS))
    step = THUMBNAIL_TILE + THUMBNAIL_PAD
    size = (THUMBNAIL_PAD + COLUMNS * step, THUMBNAIL_PAD + rows * step)
    image = Image.new("RGB", size, (255, 255, 255))
    for index, layer in enumerate(layers):
        row, col = divmod(index, COLUMNS)
        tile = _colored(layer, colormap).resize(
            (THUMBNAIL_TILE, THUMBNAIL_TILE), Image.Resampling.NEAREST
        )
        image.paste(tile, (THUMBNAIL_PAD + col * step, THUMBNAIL_PAD + row * step))
    return _encode_pil(image, "jpg")


def render_input_preview(image: Image.Image) -> bytes:
    """The decoded input (already upright and RGB) as a JPEG of at most INPUT_PREVIEW_SIDE
    pixels a side: any browser shows it, whatever the upload's format (HEIC, TIFF, CMYK)."""
    scale = min(1.0, INPUT_PREVIEW_SIDE / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    preview = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0)
    return _encode_pil(preview.convert("RGB"), "jpg")


@lru_cache(maxsize=32)
def lut(name: str) -> np.ndarray:
    rgba = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))
    return np.rint(rgba[:, :3] * 255).astype(np.uint8)


def _colormap_index(array: np.ndarray) -> np.ndarray:
    """Min-max scale a map onto 0..255 (uint8), as imshow's default autoscaling does."""
    values = np.asarray(array, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        # A NaN or an infinity makes the minimum or the maximum one: only then is a cleaned
        # copy needed (three more passes over the map).
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    index = (values - low) * (256.0 / (high - low))
    return np.clip(index, 0, 255).astype(np.uint8)


def _colormapped(array: np.ndarray, size: tuple[int, int], colormap: str) -> Image.Image:
    """The map scaled (nearest) to ``size`` and coloured through the LUT.

    The 1-byte index is scaled rather than the RGB tile (a third of the pixels to move), and
    the LUT is applied as a palette, in Pillow's C code rather than by numpy fancy indexing.
    """
    index = Image.fromarray(_colormap_index(array)).resize(size, Image.Resampling.NEAREST)
    tile = Image.frombytes("P", size, index.tobytes())
    tile.putpalette(lut(colormap).tobytes())
    return tile


def _colored(layer: LayerMap, colormap: str) -> Image.Image:
    """The map coloured through the LUT at its own size (RGB), kept on ``layer``.

    Colouring the small map and then scaling it (nearest) gives the pixels of scaling the
    1-byte index and colouring the tile (nearest only picks pixels), for a fraction of the
    pixels: the largest map is 112×112 against a 224×224 tile, and the thumbnail scales the
    same coloured map instead of indexing the map again.
    """
    colored = layer._colored.get(colormap)
    if colored is None:
        colored = Image.fromarray(lut(colormap)[_colormap_index(layer.map)])
        layer._colored[colormap] = colored
    return colored


def _draw_fast(layers: Sequence[LayerMap], colormap: str, caption: str) -> Image.Image:
    image = draw_template(tuple((layer.name, layer.shape) for layer in layers), caption).copy()
    layout = grid_layout(len(layers))
    for index, layer in enumerate(layers):
        tile = _colored(layer, colormap).resize((TILE, TILE), Image.Resampling.NEAREST)
        image.paste(tile, layout.tile_origin(index))
    return image


@lru_cache(maxsize=32)
def draw_template(
    layers: tuple[tuple[str, tuple[int, int, int]], ...], caption: str
) -> Image.Image:
    """The grid without its tiles: background, every layer's title, the caption. The same
    for every image of a job or a batch, so drawn once and cached; callers copy it."""
    layout = grid_layout(len(layers))
    caption_band = _caption_band(caption, layout.width)
    height = layout.grid_height + caption_band.height
    image = Image.new("RGB", (layout.width, height), (255, 255, 255))
    for index, (name, shape) in enumerate(layers):
        x, y = layout.tile_origin(index)
        image.paste(_title(name, shape), (x, y - TITLE_HEIGHT))
    image.paste(caption_band, (0, layout.grid_height))
    return image


# Titles and captions repeat from image to image (same layers, same job options), so their
# text is rendered once and pasted after that.
@lru_cache(maxsize=512)
def _title(name: str, shape: tuple[int, int, int]) -> Image.Image:
    channels, rows, cols = shape
    image = Image.new("RGB", (TILE + PAD, TITLE_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(FONT_SIZE)
    shown = elide(name, lambda text: draw.textlength(text, font=font) <= TILE)
    draw.text((0, 2), shown, fill=(0, 0, 0), font=font)
    draw.text((0, TITLE_HEIGHT // 2), f"{channels}×{rows}×{cols}", fill=(90, 90, 90), font=font)
    return image


def elide(name: str, fits: Callable[[str], bool]) -> str:
    """``name``, or its longest tail that ``fits`` after an ellipsis: a deep network's
    qualified names (``features.denseblock4.denselayer16.conv2``) would run into the next
    tile, and their end says which layer it is."""
    if fits(name):
        return name
    for start in range(1, len(name)):
        if fits("…" + name[start:]):
            return "…" + name[start:]
    return "…"


@lru_cache(maxsize=64)
def _caption_band(caption: str, width: int) -> Image.Image:
    font = _font(CAPTION_FONT_SIZE)
    lines = _wrap(caption, font, width - 2 * PAD)
    image = Image.new("RGB", (width, len(lines) * CAPTION_LINE_HEIGHT + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for line_no, line in enumerate(lines):
        draw.text((PAD, line_no * CAPTION_LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    return image


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont:
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return ImageFont.truetype(str(path), size)


def _wrap(text: str, font: ImageFont.FreeTypeFont, max_width: int) -> list[str]:
    """Greedy word wrap by rendered width; a word wider than a line (a long weights path)
    is broken by characters, so the caption is never cut short."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        for char in word:
            if font.getlength(current + char) > max_width and current:
                lines.append(current)
                current = ""
            current += char
    if current:
        lines.append(current)
    return lines or [""]


def _encode_pil(image: Image.Image, fmt: str) -> bytes:
    pil_format, options = _PIL_SAVE[fmt]
    buffer = io.BytesIO()
    image.save(buffer, pil_format, **options)
    return buffer.getvalue()


def _draw_matplotlib(layers: Sequence[LayerMap], colormap: str, caption: str) -> Figure:
    layout = grid_layout(len(layers))
    figure = Figure(figsize=(layout.cols * 3.0, layout.rows * 3.4 + 0.8), dpi=100)
    FigureCanvasAgg(figure)
    for index, layer in enumerate(layers):
        axes = figure.add_subplot(layout.rows, layout.cols, index + 1)
        axes.imshow(layer.map, cmap=colormap, interpolation="nearest")
        axes.axis("off")
        channels, rows, cols = layer.shape
        title = elide(layer.name, lambda text: len(text) <= MATPLOTLIB_TITLE_CHARS)
        axes.set_title(f"{title}\n{channels}×{rows}×{cols}", fontsize=10)
    figure.text(0.01, 0.005, caption, fontsize=10, wrap=True, va="bottom")
    figure.tight_layout(rect=(0.0, 0.04, 1.0, 1.0))
    return figure


def _encode_matplotlib(figure: Figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    # No creation dates and fixed SVG ids, so the same maps give the same bytes.
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
    with matplotlib.rc_context({"svg.hashsalt": "featuremaps"}):
        figure.savefig(buffer, format=fmt, metadata=metadata)
    return buffer.getvalue()
