"""worker.compute.render: figures that decode, one tile per layer, true colours, no pyplot."""

from __future__ import annotations

import gc
import io

import matplotlib
import numpy as np
import pytest
from matplotlib import _pylab_helpers
from matplotlib.figure import Figure
from PIL import Image

from worker.compute.render import (
    PAD,
    THUMBNAIL_PAD,
    THUMBNAIL_TILE,
    TILE,
    LayerMap,
    _colormap_index,
    draw_grid,
    draw_template,
    encode_grid,
    grid_layout,
    lut,
    render_grid,
    render_layer_png,
    render_thumbnail,
)

CAPTION = "ResNet-18 feature maps · weights: random, seed 0 (untrained)"


def fake_layers(count: int) -> list[LayerMap]:
    rng = np.random.default_rng(count)
    sides = [112, 56, 28, 14, 7]
    layers = []
    for index in range(count):
        side = sides[min(index // 4, 4)]
        array = rng.normal(size=(side, side)).astype(np.float32)
        layers.append(LayerMap(f"layer{index}.conv", (64, side, side), array))
    return layers


def _tile_is_drawn(pixels: np.ndarray, x: int, y: int) -> bool:
    tile = pixels[y : y + TILE, x : x + TILE].reshape(-1, 3)
    # A colormapped random map: varied colours, almost none of them paper white.
    white = np.all(tile > 245, axis=1).mean()
    return white < 0.05 and float(tile.std(axis=0).sum()) > 30


@pytest.mark.parametrize("count", [17, 20, 1])
@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_fast_grid_has_one_tile_per_layer(count, fmt):
    data = render_grid(fake_layers(count), fmt=fmt, caption=CAPTION)
    image = Image.open(io.BytesIO(data))
    assert image.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    layout = grid_layout(count)
    assert layout.cols == 4 and layout.rows == -(-count // 4)
    assert image.width == layout.width
    assert image.height > layout.grid_height  # the caption band
    pixels = np.asarray(image.convert("RGB"))
    for slot in range(layout.rows * layout.cols):
        x, y = layout.tile_origin(slot)
        if slot < count:
            assert _tile_is_drawn(pixels, x, y), slot
        else:
            assert np.all(pixels[y : y + TILE, x : x + TILE] > 245), slot


def test_fast_grid_colours_are_the_colormaps():
    ramp = np.tile(np.linspace(-3.0, 5.0, TILE, dtype=np.float32), (TILE, 1))
    data = render_grid([LayerMap("ramp", (1, TILE, TILE), ramp)], fmt="png", caption=CAPTION)
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    x, y = grid_layout(1).tile_origin(0)
    colormap = matplotlib.colormaps["viridis"]
    low = np.rint(np.array(colormap(0.0)[:3]) * 255)
    high = np.rint(np.array(colormap(1.0)[:3]) * 255)
    assert np.array_equal(pixels[y + 5, x], low)  # the minimum is the first colour
    assert np.array_equal(pixels[y + 5, x + TILE - 1], high)  # the maximum the last


def test_constant_map_does_not_divide_by_zero():
    flat = np.zeros((7, 7), dtype=np.float32)
    data = render_grid([LayerMap("flat", (3, 7, 7), flat)], fmt="png", caption=CAPTION)
    assert Image.open(io.BytesIO(data)).size[0] == grid_layout(1).width


def test_long_caption_wraps_instead_of_being_cut():
    path = "/very/long/path/" + "x" * 300 + "/weights.pt"
    short = Image.open(io.BytesIO(render_grid(fake_layers(4), fmt="png", caption=CAPTION)))
    long = Image.open(io.BytesIO(render_grid(fake_layers(4), fmt="png", caption=path)))
    assert long.width == short.width
    assert long.height > short.height + 2 * PAD


def test_matplotlib_renderer_uses_no_pyplot():
    before = _pylab_helpers.Gcf.get_num_fig_managers()
    data = render_grid(fake_layers(17), fmt="jpg", renderer="matplotlib", caption=CAPTION)
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    assert _pylab_helpers.Gcf.get_num_fig_managers() == before


@pytest.mark.parametrize(
    ("fmt", "magic"), [("svg", b"<?xml"), ("pdf", b"%PDF-"), ("png", b"\x89PNG")]
)
def test_vector_formats_through_matplotlib(fmt, magic):
    data = render_grid(fake_layers(5), fmt=fmt, renderer="fast", caption=CAPTION)
    assert data.startswith(magic)
    if fmt == "svg":
        assert b"<svg" in data[:1000] and b"layer4.conv" in data


def test_vector_output_is_reproducible():
    layers = fake_layers(3)
    first = render_grid(layers, fmt="svg", caption=CAPTION)
    assert render_grid(layers, fmt="svg", caption=CAPTION) == first


@pytest.mark.parametrize(("fmt", "renderer"), [("jpg", "fast"), ("svg", "matplotlib")])
def test_drawing_and_encoding_apart_give_the_same_figure(fmt, renderer):
    # The pipeline times the two steps itself; the figure must not change for it.
    layers = fake_layers(3)
    drawn = draw_grid(layers, fmt=fmt, renderer=renderer, caption=CAPTION)
    assert encode_grid(drawn, fmt) == render_grid(
        layers, fmt=fmt, renderer=renderer, caption=CAPTION
    )


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="gif"):
        render_grid(fake_layers(1), fmt="gif", caption=CAPTION)


@pytest.mark.parametrize(("side", "factor"), [(112, 2), (14, 16), (7, 32)])
def test_layer_png_is_scaled_by_a_whole_factor(side, factor):
    array = np.arange(side * side, dtype=np.float32).reshape(side, side)
    image = Image.open(io.BytesIO(render_layer_png(array, "gray")))
    assert image.format == "PNG"
    assert image.size == (side * factor, side * factor)
    pixels = np.asarray(image.convert("L"))
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255
    # Nearest scaling: each map pixel is a solid factor×factor block.
    assert np.all(pixels[:factor, :factor] == pixels[0, 0])


def test_matplotlib_figures_do_not_outlive_the_call():
    def live_figures() -> int:
        gc.collect()
        return sum(type(obj) is Figure for obj in gc.get_objects())

    before = live_figures()
    for fmt in ("png", "svg"):
        render_grid(fake_layers(2), fmt=fmt, renderer="matplotlib", caption=CAPTION)
    assert live_figures() == before


def _palette_tile(array: np.ndarray, side: int, colormap: str) -> Image.Image:
    """A tile as the renderers drew it before colouring moved ahead of scaling: the 1-byte
    index scaled (nearest), then coloured through the LUT as a palette."""
    index = Image.fromarray(_colormap_index(array)).resize((side, side), Image.Resampling.NEAREST)
    tile = Image.frombytes("P", (side, side), index.tobytes())
    tile.putpalette(lut(colormap).tobytes())
    return tile.convert("RGB")


def _odd_layers() -> list[LayerMap]:
    """Maps that need care: NaN, both infinities, a constant map, float64, sizes that do
    not divide the tile, a map larger than the tile."""
    rng = np.random.default_rng(7)
    holes = rng.random((9, 11)).astype(np.float32)
    holes[rng.random((9, 11)) < 0.2] = np.nan
    infinite = rng.random((5, 5)).astype(np.float32)
    infinite[0, 0], infinite[4, 4] = np.inf, -np.inf
    return [
        *fake_layers(17),
        LayerMap("nan", (3, 9, 11), holes),
        LayerMap("inf", (3, 5, 5), infinite),
        LayerMap("flat", (1, 7, 7), np.full((7, 7), 3.0, np.float32)),
        LayerMap("f64", (1, 13, 17), rng.random((13, 17))),
        LayerMap("big", (1, 300, 250), rng.normal(size=(300, 250)).astype(np.float32)),
    ]


@pytest.mark.parametrize("colormap", ["viridis", "magma", "gray"])
def test_figure_and_thumbnail_pixels_are_the_palette_tiles(colormap):
    layers = _odd_layers()
    figure = draw_grid(layers, fmt="png", colormap=colormap, caption=CAPTION)
    expected = draw_template(tuple((layer.name, layer.shape) for layer in layers), CAPTION).copy()
    layout = grid_layout(len(layers))
    for index, layer in enumerate(layers):
        expected.paste(_palette_tile(layer.map, TILE, colormap), layout.tile_origin(index))
    assert np.array_equal(np.asarray(figure), np.asarray(expected))

    # The thumbnail's JPEG is byte for byte the one of the palette tiles on white.
    step = THUMBNAIL_TILE + THUMBNAIL_PAD
    rows = -(-len(layers) // 4)
    thumbnail = Image.new("RGB", (THUMBNAIL_PAD + 4 * step, THUMBNAIL_PAD + rows * step), "white")
    for index, layer in enumerate(layers):
        row, col = divmod(index, 4)
        tile = _palette_tile(layer.map, THUMBNAIL_TILE, colormap)
        thumbnail.paste(tile, (THUMBNAIL_PAD + col * step, THUMBNAIL_PAD + row * step))
    buffer = io.BytesIO()
    thumbnail.save(buffer, "JPEG", quality=90)
    assert render_thumbnail(layers, colormap) == buffer.getvalue()
