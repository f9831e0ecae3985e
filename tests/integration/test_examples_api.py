"""A batch's dataset examples as users reach them — the API, the Python client and CLI, and
the web page in Chromium — over a real gunicorn API, Redis and SeaweedFS. The objects the
workers write (docs/design.md "Dataset examples": ``examples.json`` and its JPEG sheets) are
written here by the test, exactly as the contract lays them out, on batch records taken
through their real life (expanded, items run, completed); no worker runs. That the workers
write these objects is for the worker side's own end-to-end tests."""

from __future__ import annotations

import io
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import requests
from PIL import Image
from playwright.sync_api import Browser, Page, expect, sync_playwright

from api.openapi import openapi_document
from client import Client, Conflict, Examples, NotFound
from client.cli import main as cli_main
from shared import keys
from shared.batches import Batch as BatchRecord
from shared.batches import BatchStatus, BatchStore, ItemStatus, NewItem
from shared.item_codec import item_id
from shared.options import JobOptions
from shared.records import new_record_id
from shared.storage import ObjectStore
from tests.conftest import require_executable
from tests.integration.deployment import Deployment

ALICE = {"Authorization": "Bearer tok-alice"}
BOB = {"Authorization": "Bearer tok-bob"}
K = 3
TILE = 64
SHEET_CHANNELS = 64
ITEMS = 5
# (name, shape): the second layer has two sheets, the last one of 6 rows.
LAYERS = [("conv1", (8, 4, 4)), ("layer1.0.conv1", (70, 2, 2))]
# Chromium logs every 4xx answer to fetch() as a console error; the 409 and 404 pages
# provoke them on purpose and accept exactly those.
SCREENSHOTS = Path(__file__).resolve().parents[2] / "out" / "web"
REFUSED_FETCH = re.compile(r"^Failed to load resource: the server responded with a status of 4\d\d")


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory) -> Iterator[Deployment]:
    """An API only (the records and objects are written by the test), with two tokens."""
    dep = Deployment(
        tmp_path_factory.mktemp("examples"),
        redis_url=redis_server.url.rsplit("/", 1)[0] + "/23",
        s3=s3_server,
        bucket=f"examples-{uuid.uuid4().hex[:8]}",
        api_tokens="alice:tok-alice,bob:tok-bob",
    )
    dep.redis.flushdb()
    try:
        dep.api = dep.start_api()
        yield dep
    finally:
        dep.stop()


@pytest.fixture(scope="module")
def store(deployment: Deployment) -> ObjectStore:
    return deployment.object_store()


def tile_colour(layer: int, channel: int, rank: int) -> tuple[int, int, int]:
    """Each tile a flat colour of its own, so a crop shows which tile it is."""
    return ((40 * rank + 30) % 256, (23 * channel) % 256, 60 + 120 * layer)


def member_name(n: int) -> str:
    return f"photos/IMG_{n:04d}.JPG"


@dataclass
class Made:
    id: str
    examples: dict | None  # examples.json as written


def make_batch(
    deployment: Deployment,
    store: ObjectStore,
    *,
    ended: bool = True,
    examples: bool = True,
    k: int = K,
    layers: list[tuple[str, tuple[int, int, int]]] = LAYERS,
) -> Made:
    """A batch of ITEMS succeeded items owned by alice; ended with the result the workers
    write (with ``examples_key`` when ``examples``: ``k`` per channel of ``layers``), or
    left running."""
    records = BatchStore(deployment.redis, ttl_s=3600)
    batch_id = new_record_id()
    # A batch's options as the API stores them (every option, examples as asked).
    options = JobOptions.for_batch({"examples": str(k if examples else 0)}).to_dict()
    records.create(
        BatchRecord(
            id=batch_id,
            status=BatchStatus.QUEUED,
            options=options,
            source={"kind": "archive", "name": "photos.zip"},
            owner="alice",
        )
    )
    records.begin_expansion(batch_id)
    ids = [item_id(batch_id, n) for n in range(ITEMS)]
    records.add_items(batch_id, [NewItem(i, member_name(n)) for n, i in enumerate(ids)])
    records.end_expansion(batch_id)
    records.start_items(batch_id, ids, token="chunk")
    outcomes = []
    for n, i in enumerate(ids):
        figure = keys.figure_key(i, "jpg", attempt="g1")
        store.put_bytes(figure, _jpeg(Image.new("RGB", (32, 32), (n * 40, 90, 90))), "image/jpeg")
        outcomes.append((i, ItemStatus.SUCCEEDED, {"name": member_name(n), "figure_key": figure}))
    records.finish_items(batch_id, outcomes)
    if not ended:
        return Made(batch_id, None)
    manifest, archive = keys.batch_result_keys(batch_id, 1, 1)
    result = {"manifest_key": manifest, "archive_key": archive}
    document = None
    if examples:
        document = write_examples(store, batch_id, ids, k, layers)
        result["examples_key"] = f"batches/{batch_id}/examples.json"
    records.complete(batch_id, result)
    assert records.get(batch_id).status is BatchStatus.SUCCEEDED
    return Made(batch_id, document)


def write_examples(
    store: ObjectStore,
    batch_id: str,
    ids: list[str],
    k: int,
    shapes: list[tuple[str, tuple[int, int, int]]],
) -> dict:
    """examples.json and the sheets, laid out as docs/design.md says (the same item may
    appear more than once in a top list when ``k`` > ITEMS: only the layout matters here)."""
    layers = []
    for index, (name, shape) in enumerate(shapes):
        channels = shape[0]
        top = [
            [
                {
                    "item_id": ids[(c + r) % ITEMS],
                    "name": member_name((c + r) % ITEMS),
                    "score": round(10.0 - r - c / 100, 4),
                }
                for r in range(k)
            ]
            for c in range(channels)
        ]
        sheets = []
        for group in range(-(-channels // SHEET_CHANNELS)):
            rows = min(SHEET_CHANNELS, channels - group * SHEET_CHANNELS)
            sheet = Image.new("RGB", (TILE * k, TILE * rows), (128, 128, 128))
            for row in range(rows):
                for rank in range(k):
                    colour = tile_colour(index, group * SHEET_CHANNELS + row, rank)
                    sheet.paste(
                        colour, (TILE * rank, TILE * row, TILE * rank + TILE, TILE * row + TILE)
                    )
            key = f"batches/{batch_id}/examples/sheets/{index:02d}-{group:03d}.jpg"
            store.put_bytes(key, _jpeg(sheet), "image/jpeg")
            sheets.append(key)
        layers.append(
            {
                "index": index,
                "name": name,
                "channels": channels,
                "shape": list(shape),
                "channel_mean": [round(5.0 - c / 100, 4) for c in range(channels)],
                "channel_max": [round(10.0 - c / 100, 4) for c in range(channels)],
                "sheets": sheets,
                "top": top,
            }
        )
    document = {
        "k": k,
        "score": "mean",
        "mode": "chain",
        "weights": {"name": "random", "seed": 0},
        "precision": {"mode": "exact"},
        "items": ITEMS,
        "tile": TILE,
        "sheet_channels": SHEET_CHANNELS,
        "missing": [],
        "layers": layers,
    }
    store.put_bytes(
        f"batches/{batch_id}/examples.json", json.dumps(document).encode(), "application/json"
    )
    return document


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def finished(deployment, store) -> Made:
    return make_batch(deployment, store)


@pytest.fixture(scope="module")
def large(deployment, store) -> Made:
    """ResNet-18's widest layer with the default K: 512 channels × 9, eight sheets."""
    return make_batch(deployment, store, k=9, layers=[("layer4.1.conv2", (512, 7, 7))])


@pytest.fixture(scope="module")
def running(deployment, store) -> Made:
    return make_batch(deployment, store, ended=False)


@pytest.fixture(scope="module")
def without_examples(deployment, store) -> Made:
    return make_batch(deployment, store, examples=False)


def get(deployment: Deployment, path: str, headers=ALICE) -> requests.Response:
    return requests.get(f"{deployment.api}{path}", headers=headers, timeout=30)


def conforms(doc: dict, schema_name: str) -> None:
    """``doc`` is valid against the OpenAPI document's component ``schema_name``."""
    schema = {**openapi_document(), "$ref": f"#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema).validate(doc)


# -- the API ------------------------------------------------------------------------------


def test_the_batch_document_links_its_examples(deployment, finished, without_examples):
    doc = get(deployment, f"/batches/{finished.id}").json()
    conforms(doc, "Batch")
    stored = requests.get(doc["result"]["examples_url"], timeout=30)
    assert stored.status_code == 200 and stored.json() == finished.examples
    assert doc["links"]["examples"] == f"/batches/{finished.id}/examples"
    assert doc["links"]["examples_page"] == f"/ui/batches/{finished.id}/examples"

    plain = get(deployment, f"/batches/{without_examples.id}").json()
    assert plain["result"]["examples_url"] is None
    assert plain["links"]["examples"] == f"/batches/{without_examples.id}/examples"


def test_the_summary_has_every_layer_without_the_channel_lists(deployment, finished):
    response = get(deployment, f"/batches/{finished.id}/examples")
    assert response.status_code == 200, response.text
    summary = response.json()
    conforms(summary, "Examples")
    written = finished.examples
    head = {k: v for k, v in written.items() if k != "layers"}
    assert {k: v for k, v in summary.items() if k != "layers"} == head
    assert [layer["name"] for layer in summary["layers"]] == [name for name, _ in LAYERS]
    for layer, entry in zip(summary["layers"], written["layers"], strict=True):
        assert set(layer) == {"index", "name", "channels", "shape", "sheets", "url"}
        assert layer["url"] == f"/batches/{finished.id}/examples/{entry['index']}"
        assert len(layer["sheets"]) == len(entry["sheets"])
        for url, key in zip(layer["sheets"], entry["sheets"], strict=True):
            assert key in url and "X-Amz-Signature=" in url
            sheet = Image.open(io.BytesIO(requests.get(url, timeout=30).content))
            assert sheet.format == "JPEG" and sheet.width == TILE * K
    # The last sheet of the second layer holds its 70 - 64 channels.
    last = requests.get(summary["layers"][1]["sheets"][1], timeout=30).content
    assert Image.open(io.BytesIO(last)).height == TILE * 6


def test_a_layer_by_index_or_name_is_its_entry_in_full(deployment, finished):
    for index, (name, _shape) in enumerate(LAYERS):
        by_index = get(deployment, f"/batches/{finished.id}/examples/{index}")
        by_name = get(deployment, f"/batches/{finished.id}/examples/{name}")
        assert by_index.status_code == by_name.status_code == 200, by_index.text
        doc = by_index.json()
        conforms(doc, "ExamplesLayer")
        written = finished.examples["layers"][index]
        assert {k: v for k, v in doc.items() if k != "sheets"} == {
            k: v for k, v in written.items() if k != "sheets"
        }
        assert by_name.json()["top"] == doc["top"]
        assert len(doc["top"]) == written["channels"] and all(len(t) == K for t in doc["top"])
        for url in doc["sheets"]:
            assert requests.get(url, timeout=30).status_code == 200


def test_refusals(deployment, finished, running, without_examples):
    def error(path: str, headers=ALICE) -> tuple[int, str]:
        response = get(deployment, path, headers)
        conforms(response.json(), "Error")
        return response.status_code, response.json()["error"]["code"]

    for path in ("/examples", "/examples/0"):
        assert error(f"/batches/{running.id}{path}") == (409, "conflict")
        assert error(f"/batches/{without_examples.id}{path}") == (404, "not_found")
        # Another token's batch does not exist for it; no token is refused.
        assert error(f"/batches/{finished.id}{path}", BOB) == (404, "not_found")
        assert error(f"/batches/{finished.id}{path}", {}) == (401, "unauthorized")
        assert error(f"/batches/nope{path}") == (404, "not_found")
    for layer in ("2", "99", "layer9", "conv1.x"):
        assert error(f"/batches/{finished.id}/examples/{layer}") == (404, "not_found")
    message = get(deployment, f"/batches/{without_examples.id}/examples").json()["error"]
    assert "examples=0" in message["message"]


# -- the client and the CLI -----------------------------------------------------------------


@pytest.fixture(scope="module")
def client(deployment) -> Client:
    return Client(deployment.api, token="tok-alice")


def test_the_client_structure_and_its_tiles(client, finished):
    examples = client.get_batch(finished.id).examples()
    assert isinstance(examples, Examples)
    assert (examples.k, examples.score, examples.mode, examples.items) == (K, "mean", "chain", 5)
    assert (examples.tile, examples.sheet_channels, examples.missing) == (TILE, 64, [])
    assert [(layer.index, layer.name) for layer in examples.layers] == [
        (0, "conv1"),
        (1, "layer1.0.conv1"),
    ]
    layer = examples.layer("layer1.0.conv1")
    assert layer is examples.layer(1)
    assert layer.shape == (70, 2, 2) and layer.channels == 70
    written = finished.examples["layers"][1]
    assert layer.channel_mean == written["channel_mean"]
    assert layer.channel_max == written["channel_max"]
    best = layer.top[66][0]
    assert (best.item_id, best.name, best.score, best.rank) == (
        written["top"][66][0]["item_id"],
        written["top"][66][0]["name"],
        written["top"][66][0]["score"],
        0,
    )

    # Channel 66, rank 2: the second sheet, row 2, column 2.
    picture = layer.picture(66, 2)
    assert picture.sheet_url == layer.sheets[1]
    assert picture.box == (128, 128, 192, 192)
    tile = examples.tile_image(layer, 66, 2)
    sheet = Image.open(io.BytesIO(requests.get(layer.sheets[1], timeout=30).content))
    assert tile.size == (TILE, TILE)
    assert tile.tobytes() == sheet.convert("RGB").crop(picture.box).tobytes()
    assert _close(tile.getpixel((32, 32)), tile_colour(1, 66, 2))
    assert _close(examples.tile_image("conv1", 5).getpixel((10, 50)), tile_colour(0, 5, 0))
    with pytest.raises(IndexError):
        layer.picture(70, 0)
    with pytest.raises(KeyError):
        examples.layer("fc")


def _close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 6) -> bool:
    """JPEG keeps a flat 64×64 block within a few levels."""
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def test_the_client_raises_typed_errors(client, running, without_examples):
    with pytest.raises(Conflict) as raised:
        client.get_batch(running.id).examples()
    assert raised.value.status == 409 and raised.value.code == "conflict"
    with pytest.raises(NotFound) as raised:
        client.get_batch(without_examples.id).examples()
    assert raised.value.status == 404


def test_the_cli_downloads_examples_json_and_the_sheets(deployment, finished, tmp_path, capsys):
    out = tmp_path / "examples"
    argv = ["examples", finished.id, "-o", str(out), "--api", deployment.api]
    assert cli_main([*argv, "--token", "tok-alice"]) == 0
    assert json.loads((out / "examples.json").read_text()) == finished.examples
    names = sorted(path.name for path in (out / "sheets").iterdir())
    assert names == ["00-000.jpg", "01-000.jpg", "01-001.jpg"]
    with Image.open(out / "sheets" / "01-001.jpg") as last:
        assert last.size == (TILE * K, TILE * 6)
    assert "3 sheets" in capsys.readouterr().out
    # Another token: the batch is not found, and the command says so.
    assert cli_main([*argv, "--token", "tok-bob"]) == 1
    assert "404 not_found" in capsys.readouterr().err


# -- the web page -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = require_executable("chromium", "apt-get install chromium, i.e. `make setup`")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=args)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser, deployment: Deployment):
    """``open_page(path) -> (page, console)``: a fresh context whose tab holds alice's token
    (as the token form leaves it) before the page's scripts run."""
    contexts = []

    def open_(path: str, on_request=None) -> tuple[Page, list[str]]:
        context = browser.new_context(
            base_url=deployment.api, viewport={"width": 1280, "height": 900}
        )
        contexts.append(context)
        context.add_init_script("sessionStorage.setItem('featuremaps-token', 'tok-alice')")
        page = context.new_page()
        page.set_default_timeout(30_000)
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: console.append(f"uncaught: {exc}"))
        if on_request is not None:
            page.on(
                "request",
                lambda r: on_request(r.url) if "/examples/sheets/" in r.url else None,
            )
        page.goto(path)
        return page, console

    yield open_
    for context in contexts:
        context.close()


def test_the_page_shows_each_channels_examples_and_opens_one(open_page, finished):
    page, console = open_page(f"/ui/batches/{finished.id}/examples")
    cells = page.locator("#channels li")
    expect(cells).to_have_count(8)
    expect(page.locator("#summary")).to_contain_text("5 items scored")
    assert page.locator("#channels li .example").count() == 8 * K
    # The visible cells got their sheet, and it loaded.
    expect(page.locator("#channels li[data-shown]")).to_have_count(8)
    style = page.eval_on_selector(
        "#channels li[data-channel='5'] .example:nth-child(2)",
        "e => [getComputedStyle(e).backgroundImage, getComputedStyle(e).backgroundPosition]",
    )
    assert "00-000.jpg" in style[0] and style[1] == "-64px -320px"

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "examples-grid.png"))
    page.select_option("#layer", "1")
    expect(cells).to_have_count(70)
    assert page.locator("#channels li .example").count() == 70 * K
    expect(page.locator("#channels li[data-channel='66'] .caption")).to_contain_text("#66")
    page.locator("#channels li[data-channel='66'] button").scroll_into_view_if_needed()
    page.locator("#channels li[data-channel='66'] button").click()
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    expect(page.locator("#viewer-title")).to_have_text("layer1.0.conv1 · channel 66")
    cards = page.locator("#viewer-examples li")
    expect(cards).to_have_count(K)
    top = finished.examples["layers"][1]["top"][66]
    expect(cards.locator(".name")).to_have_text([entry["name"] for entry in top])
    expect(page.locator("#viewer-examples canvas[data-drawn='true']")).to_have_count(K)
    box = page.locator("#viewer-examples canvas").first.bounding_box()
    assert box is not None and round(box["width"]) == 192
    # Each name links to that item's figure.
    expect(cards.first.locator("a")).to_have_attribute("href", re.compile(r"^http"))
    href = cards.first.locator("a").get_attribute("href")
    figure = requests.get(href, timeout=30)
    assert figure.status_code == 200 and Image.open(io.BytesIO(figure.content)).size == (32, 32)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "examples-channel.png"))
    page.get_by_role("button", name="Close").click()
    expect(viewer).to_be_hidden()
    assert console == []


def test_512_channels_of_9_build_at_once_and_load_one_request_per_sheet(open_page, large):
    sheets: list[str] = []
    started = time.monotonic()
    page, console = open_page(f"/ui/batches/{large.id}/examples", on_request=sheets.append)
    expect(page.locator("#channels li")).to_have_count(512)
    shown_s = time.monotonic() - started
    assert page.locator("#channels .example").count() == 512 * 9
    # Only the first screens have their sheet yet; scrolling through loads the rest, each
    # sheet once however many of its tiles are shown. The observer reveals cells after the
    # grid is built and the request event follows, so wait for the first one.
    expect(page.locator("#channels li[data-channel='0'][data-shown]")).to_have_count(1)
    deadline = time.monotonic() + 30
    while not sheets and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert 0 < len(sheets) < 8
    for channel in range(0, 512, 32):
        page.locator(f"#channels li[data-channel='{channel}']").scroll_into_view_if_needed()
    page.locator("#channels li[data-channel='511']").scroll_into_view_if_needed()
    expect(page.locator("#channels li[data-shown]")).to_have_count(512)
    page.wait_for_load_state("networkidle")
    assert sorted(re.sub(r"\?.*", "", url).rsplit("/", 1)[1] for url in sheets) == [
        f"00-{group:03d}.jpg" for group in range(8)
    ]
    page.locator("#channels li[data-channel='200'] button").click()
    expect(page.locator("#viewer-examples canvas")).to_have_count(9)
    assert shown_s < 20, f"512 channels took {shown_s:.1f} s to show"
    assert console == []


def test_the_batch_page_links_the_examples(open_page, finished):
    page, console = open_page(f"/ui/batches/{finished.id}")
    link = page.locator("#examples-link")
    expect(link).to_have_attribute("href", f"/ui/batches/{finished.id}/examples")
    link.click()
    expect(page.locator("#channels li")).to_have_count(8)
    assert console == []


def test_the_page_says_why_there_are_no_examples(open_page, running, without_examples):
    page, console = open_page(f"/ui/batches/{running.id}/examples")
    expect(page.locator("#summary")).to_contain_text("still running")
    expect(page.locator("#channels li")).to_have_count(0)
    assert all(REFUSED_FETCH.match(text) for text in console), console

    page, console = open_page(f"/ui/batches/{without_examples.id}/examples")
    expect(page.locator("#message")).to_contain_text("examples=0")
    expect(page.locator("#summary")).to_contain_text("No dataset examples")
    assert all(REFUSED_FETCH.match(text) for text in console), console
