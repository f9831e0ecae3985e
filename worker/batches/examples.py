"""Where a batch's dataset examples are gathered: partial top K per result shard, the final
top lists once, example slices through the model again, and the assembled sheets and
``examples.json`` (docs/design.md "Dataset examples"). Like the result shards, each step
writes objects whose keys the plan fixes, so a step run twice writes the same bytes.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from shared import keys
from shared.batches import Batch, Item, ItemStatus
from shared.item_codec import item_id, member_index
from shared.options import JobOptions
from worker.batches import IO_THREADS
from worker.batches.result_shards import ResultShards
from worker.batches.streams import pages
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)

# How a slice is handed on: in a worker, a task sent by name; None runs it here and now.
DispatchSlice = Callable[[str, int], None] | None

SHEET_CHANNELS = 64
# Index of "no item" in a top list: sorts after every real member index.
NO_ITEM = np.iinfo(np.int64).max
SCORE_ROWS = {"mean": 0, "max": 1}
WINNERS = "winners.npz"
_SHEET_BACKGROUND = (128, 128, 128)


def example_slices(ctx: WorkerContext) -> ResultShards:
    return ResultShards(ctx.redis, ttl_s=ctx.settings.job_ttl_s, kind="examples")


@dataclass
class TopLists:
    """Per channel (columns): the best ``k`` scores and their member indexes (rows, best
    first; NO_ITEM where there are fewer), and the sum, maximum and count of all scores."""

    scores: np.ndarray  # float32 [k, C]
    items: np.ndarray  # int64 [k, C]
    total: np.ndarray  # float64 [C]
    maximum: np.ndarray  # float32 [C]
    count: int
    layout: list[dict[str, Any]]  # [{name, shape}] in layer order

    @classmethod
    def empty(cls, k: int, layout: list[dict[str, Any]]) -> TopLists:
        channels = sum(layer["shape"][0] for layer in layout)
        return cls(
            scores=np.full((k, channels), -np.inf, np.float32),
            items=np.full((k, channels), NO_ITEM, np.int64),
            total=np.zeros(channels, np.float64),
            maximum=np.full(channels, -np.inf, np.float32),
            count=0,
            layout=layout,
        )

    def add(self, scores: np.ndarray, items: np.ndarray) -> None:
        """Take in ``scores`` [n, C] of the members ``items`` [n]."""
        self.total += scores.sum(axis=0, dtype=np.float64)
        self.maximum = np.maximum(self.maximum, scores.max(axis=0))
        self.count += len(items)
        self._merge(scores, np.broadcast_to(items[:, None], scores.shape))

    def merge(self, other: TopLists) -> None:
        self.total += other.total
        self.maximum = np.maximum(self.maximum, other.maximum)
        self.count += other.count
        self._merge(other.scores, other.items)

    def _merge(self, scores: np.ndarray, items: np.ndarray) -> None:
        k = len(self.scores)
        both_scores = np.concatenate([self.scores, scores])
        both_items = np.concatenate([self.items, items])
        # Best first: score descending (NaN last), then member index ascending.
        rank = np.where(np.isnan(both_scores), np.inf, -both_scores)
        order = np.lexsort((both_items, rank), axis=0)[:k]
        self.scores = np.take_along_axis(both_scores, order, axis=0)
        self.items = np.take_along_axis(both_items, order, axis=0)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            scores=self.scores,
            items=self.items,
            total=self.total,
            maximum=self.maximum,
            count=np.array(self.count),
            layout=np.frombuffer(json.dumps(self.layout).encode(), np.uint8),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TopLists:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return cls(
                scores=f["scores"],
                items=f["items"],
                total=f["total"],
                maximum=f["maximum"],
                count=int(f["count"]),
                layout=json.loads(f["layout"].tobytes()),
            )


def partial_name(shard: int) -> str:
    return f"partial-{shard:05d}.npz"


def write_partial(ctx: WorkerContext, batch: Batch, shard: int, items: Iterator[Item]) -> None:
    """Result shard ``shard``'s partial top lists over its succeeded items' stored scores."""
    options = JobOptions.from_mapping(batch.options)
    row = SCORE_ROWS[options.examples_score]
    top: TopLists | None = None
    succeeded = (i for i in items if i.status is ItemStatus.SUCCEEDED and i.info.get("scores_key"))
    with ThreadPoolExecutor(IO_THREADS) as pool:
        for page in pages(succeeded, IO_THREADS * 32):
            scores = list(pool.map(lambda i: _load_scores(ctx, i.info["scores_key"]), page))
            if top is None:
                top = TopLists.empty(options.examples, _layout(ctx, page[0]))
            indexes = np.array([member_index(batch.id, i.id) for i in page], np.int64)
            top.add(np.stack([s[row] for s in scores]), indexes)
    if top is None:
        top = TopLists.empty(options.examples, [])
    key = keys.examples_part_key(batch.id, partial_name(shard))
    ctx.store.put_bytes(key, top.to_bytes(), "application/octet-stream")


def _load_scores(ctx: WorkerContext, key: str) -> np.ndarray:
    return np.load(io.BytesIO(ctx.store.get_bytes(key)), allow_pickle=False)


def _layout(ctx: WorkerContext, item: Item) -> list[dict[str, Any]]:
    """The layers' names and shapes, in order, from an item's manifest."""
    manifest = json.loads(ctx.store.get_bytes(item.info["manifest_key"]))
    return [{"name": layer["name"], "shape": layer["shape"]} for layer in manifest["layers"]]


def plan_examples(
    ctx: WorkerContext, batch_id: str, shards: int, dispatch: DispatchSlice
) -> str | None:
    """Merge the result shards' partials into the final top lists (once: a later call reads
    them back) and plan the example slices; dispatch the slices not written yet. Returns the
    examples' key when nothing is left to run (the caller closes the batch), else None."""
    winners = _winners(ctx, batch_id, shards)
    distinct = _distinct(winners)
    slices = example_slices(ctx)
    plan = slices.plan(batch_id, total=len(distinct), size=ctx.settings.example_slice_items)
    written = {s["index"] for s in slices.written(batch_id)}
    missing = [n for n in range(1, plan.count + 1) if n not in written]
    if not len(distinct) or not missing:
        return assemble(ctx, batch_id)
    log.info("batch %s: %d example slices, %d to render", batch_id, plan.count, len(missing))
    for n in missing:
        if dispatch is None:
            key = render_slice(ctx, batch_id, n)
            if key is not None:
                return key
        else:
            dispatch(batch_id, n)
    return None


def _winners(ctx: WorkerContext, batch_id: str, shards: int) -> TopLists:
    key = keys.examples_part_key(batch_id, WINNERS)
    if ctx.store.exists(key):
        return read_winners(ctx, batch_id)
    partials = [
        TopLists.from_bytes(ctx.store.get_bytes(keys.examples_part_key(batch_id, partial_name(n))))
        for n in range(1, shards + 1)
    ]
    with_items = [p for p in partials if p.layout]
    winners = with_items[0] if with_items else partials[0]
    for partial in with_items[1:]:
        winners.merge(partial)
    ctx.store.put_bytes(key, winners.to_bytes(), "application/octet-stream")
    return winners


def read_winners(ctx: WorkerContext, batch_id: str) -> TopLists:
    """The final top lists, once :func:`plan_examples` has merged them."""
    return TopLists.from_bytes(ctx.store.get_bytes(keys.examples_part_key(batch_id, WINNERS)))


def _distinct(winners: TopLists) -> np.ndarray:
    return np.unique(winners.items[winners.items != NO_ITEM])


def slice_name(n: int) -> str:
    return f"slice-{n:05d}.npz"


def render_slice(ctx: WorkerContext, batch_id: str, n: int) -> str | None:
    """Run slice ``n``'s winning items through the model again and store the tiles of every
    top-list place they hold; the task that records the last slice assembles the examples
    and returns their key (the caller closes the batch), others return None."""
    from worker.compute.examples import draw_tile
    from worker.compute.render import lut

    batch = ctx.batches.get(batch_id)
    options = JobOptions.from_mapping(batch.options)
    winners = read_winners(ctx, batch_id)
    slices = example_slices(ctx)
    first, count = slices.planned(batch_id).span(n)
    members = _distinct(winners)[first : first + count]
    places = _places(winners, members)
    colours = lut(options.colormap)
    tiles: dict[str, np.ndarray] = {}
    for member, image in _example_images(ctx, batch, options, members):
        if image is None:
            continue
        for rank, channel, layer, within in places[int(member)]:
            tile = draw_tile(image.picture, image.layers[layer][within], colours)
            tiles[f"{channel}_{rank}"] = np.frombuffer(_jpeg(tile, quality=95), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **tiles)
    ctx.store.put_bytes(
        keys.examples_part_key(batch_id, slice_name(n)),
        buffer.getvalue(),
        "application/octet-stream",
    )
    return record_slice(ctx, batch_id, n, {"index": n, "tiles": len(tiles)})


def record_slice(ctx: WorkerContext, batch_id: str, n: int, summary: dict) -> str | None:
    """Record slice ``n``; whoever records the last one assembles the examples."""
    slices = example_slices(ctx)
    if slices.record(batch_id, n, summary) < slices.planned(batch_id).count:
        return None
    return assemble(ctx, batch_id)


def _places(winners: TopLists, members: np.ndarray) -> dict[int, list[tuple[int, int, str, int]]]:
    """For each of ``members``: the (rank, channel, layer name, channel within the layer) of
    every top-list place it holds."""
    names, starts = _channel_starts(winners.layout)
    places: dict[int, list[tuple[int, int, str, int]]] = {int(m): [] for m in members}
    ranks, channels = np.nonzero(np.isin(winners.items, members))
    for rank, channel in zip(ranks.tolist(), channels.tolist(), strict=True):
        layer = int(np.searchsorted(starts, channel, side="right")) - 1
        member = int(winners.items[rank, channel])
        places[member].append((rank, channel, names[layer], channel - int(starts[layer])))
    return places


def _channel_starts(layout: list[dict[str, Any]]) -> tuple[list[str], np.ndarray]:
    channels = [layer["shape"][0] for layer in layout]
    return [layer["name"] for layer in layout], np.cumsum([0, *channels[:-1]])


def _example_images(
    ctx: WorkerContext, batch: Batch, options: JobOptions, members: np.ndarray
) -> Iterator[tuple[int, Any]]:
    """(member, ExampleImage or None) for each member, a model slice at a time."""
    from worker.compute.examples import example_images
    from worker.compute.pipeline import CPU_MODEL_BATCH

    ids = [item_id(batch.id, int(m)) for m in members]
    items = ctx.batches.get_items(batch.id, ids)
    with ThreadPoolExecutor(IO_THREADS) as pool:
        for start in range(0, len(ids), CPU_MODEL_BATCH):
            part = ids[start : start + CPU_MODEL_BATCH]
            datas = list(pool.map(lambda i: _input(ctx, items[i]), part))
            images = example_images(
                ctx.model_for(options, batch.owner),
                datas,
                options,
                max_pixels=ctx.settings.max_image_pixels,
            )
            for member, image in zip(members[start : start + len(part)], images, strict=True):
                ok = not isinstance(image, Exception)
                yield int(member), image if ok else None


def _input(ctx: WorkerContext, item: Item) -> bytes:
    offset, length = item.info["input_range"]
    return ctx.store.get_range(item.info["input_key"], offset, length)


def assemble(ctx: WorkerContext, batch_id: str) -> str:
    """Draw the sheets from the slices' tiles and write ``examples.json`` last; returns its
    key. Slices that recorded no tiles (they gave up) are listed as ``missing``."""
    from worker.compute.examples import TILE

    batch = ctx.batches.get(batch_id)
    options = JobOptions.from_mapping(batch.options)
    winners = read_winners(ctx, batch_id)
    written = example_slices(ctx).written(batch_id)
    tiles = _all_tiles(ctx, batch_id, [s["index"] for s in written if not s.get("missing")])
    _names, starts = _channel_starts(winners.layout)
    names = _member_names(ctx, batch, winners.items)
    layers = []
    for index, layer in enumerate(winners.layout):
        channels = layer["shape"][0]
        start = int(starts[index])
        sheets = []
        for group in range(-(-channels // SHEET_CHANNELS)):
            first = start + group * SHEET_CHANNELS
            count = min(SHEET_CHANNELS, channels - group * SHEET_CHANNELS)
            sheet = _sheet(tiles, first, count, options.examples, TILE)
            key = keys.examples_part_key(batch_id, f"sheets/{index:02d}-{group:03d}.jpg")
            ctx.store.put_bytes(key, sheet, "image/jpeg")
            sheets.append(key)
        layers.append(_layer_entry(batch, winners, names, index, start, sheets))
    document = {
        "k": options.examples,
        "score": options.examples_score,
        "mode": options.mode,
        "weights": _first_weights(ctx, batch, winners),
        "precision": options.precision,
        "items": winners.count,
        "tile": TILE,
        "sheet_channels": SHEET_CHANNELS,
        "missing": sorted(s["index"] for s in written if s.get("missing")),
        "layers": layers,
    }
    key = keys.examples_key(batch_id)
    data = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    ctx.store.put_bytes(key, data, "application/json")
    log.info("batch %s: dataset examples assembled (%d tiles)", batch_id, len(tiles))
    return key


def _all_tiles(ctx: WorkerContext, batch_id: str, slices: list[int]) -> dict[str, bytes]:
    def load(n: int) -> dict[str, bytes]:
        data = ctx.store.get_bytes(keys.examples_part_key(batch_id, slice_name(n)))
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return {name: f[name].tobytes() for name in f.files}

    tiles: dict[str, bytes] = {}
    with ThreadPoolExecutor(IO_THREADS) as pool:
        for part in pool.map(load, slices):
            tiles.update(part)
    return tiles


def _sheet(tiles: dict[str, bytes], first: int, count: int, k: int, tile: int) -> bytes:
    sheet = Image.new("RGB", (max(1, k) * tile, count * tile), _SHEET_BACKGROUND)
    for row in range(count):
        for rank in range(k):
            data = tiles.get(f"{first + row}_{rank}")
            if data is not None:
                sheet.paste(Image.open(io.BytesIO(data)), (rank * tile, row * tile))
    return _jpeg(np.asarray(sheet), quality=85)


def _jpeg(pixels: np.ndarray, *, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _layer_entry(
    batch: Batch,
    winners: TopLists,
    names: dict[int, str],
    index: int,
    start: int,
    sheets: list,
) -> dict[str, Any]:
    """Layer ``index``'s entry of examples.json; ``names`` by member index, of every winner."""
    layer = winners.layout[index]
    channels = layer["shape"][0]
    end = start + channels
    top = []
    for channel in range(start, end):
        entries = []
        for rank in range(len(winners.items)):
            member = int(winners.items[rank, channel])
            if member == NO_ITEM:
                break
            entries.append(
                {
                    "item_id": item_id(batch.id, member),
                    "name": names[member],
                    "score": _number(winners.scores[rank, channel]),
                }
            )
        top.append(entries)
    count = max(winners.count, 1)
    return {
        "index": index,
        "name": layer["name"],
        "channels": channels,
        "shape": layer["shape"],
        "channel_mean": [_number(v / count) for v in winners.total[start:end]],
        "channel_max": [_number(v) for v in winners.maximum[start:end]],
        "sheets": sheets,
        "top": top,
    }


def _member_names(ctx: WorkerContext, batch: Batch, members: np.ndarray) -> dict[int, str]:
    """The member name of each item in ``members`` (read once, in one pipelined call)."""
    wanted = sorted({int(m) for m in members.ravel() if m != NO_ITEM})
    items = ctx.batches.get_items(batch.id, [item_id(batch.id, m) for m in wanted])
    return {m: items[item_id(batch.id, m)].name for m in wanted}


def _first_weights(ctx: WorkerContext, batch: Batch, winners: TopLists) -> Any:
    """The weights that made the scores, from a winning item's manifest (None without one)."""
    members = winners.items[winners.items != NO_ITEM]
    if not len(members):
        return None
    item = ctx.batches.get_items(batch.id, [item_id(batch.id, int(members.min()))])
    manifest = json.loads(ctx.store.get_bytes(next(iter(item.values())).info["manifest_key"]))
    return manifest.get("weights")


def _number(value: Any) -> float | None:
    """A float32 score as JSON: the shortest decimal that reads back as the same float32;
    None for NaN or an infinity."""
    value = np.float32(value)
    return float(str(value)) if np.isfinite(value) else None
