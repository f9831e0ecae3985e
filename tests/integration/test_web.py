"""The web page in a real headless Chromium (Debian's ``chromium``, driven by playwright)
against a real deployment with tokens: upload a photo and see its figure load, open a layer
and read values under the cursor, a refused file shows the server's message, an archive's
progress bar reaches 100 % and its gallery fills, a Mac zip's metadata is listed as skipped
(not failed), a wrong token is refused, a shared link
works in a fresh tab, and the pages fit a phone. Screenshots go to ``out/web/``."""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests import photos
from tests.archive_makers import NAME, finder_zip
from tests.conftest import require_executable
from tests.helpers import wait_for_job
from tests.integration.deployment import Deployment

TOKEN = "web-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCREENSHOTS = Path(__file__).resolve().parents[2] / "out" / "web"
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
JOB_DONE_MS = 120_000
SHARD_ITEMS = 7
# Chromium logs every 4xx answer to fetch() as a console error; tests that provoke one on
# purpose accept exactly those and nothing else.
REFUSED_FETCH = re.compile(r"^Failed to load resource: the server responded with a status of 4\d\d")


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory) -> Iterator[Deployment]:
    with Deployment.started(
        tmp_path_factory.mktemp("web"),
        redis_server,
        s3_server,
        name="web",
        db=10,
        api_tokens=TOKEN,
        models="resnet18,vgg16",
        # The 7-member archive below makes one result shard, a 9-member one two.
        result_shard_items=str(SHARD_ITEMS),
    ) as dep:
        yield dep


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = require_executable("chromium", "apt-get install chromium, i.e. `make setup`")
    # Chromium's sandbox cannot start as root (CI runs as root).
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=args)
        yield browser
        browser.close()


class Console(list):
    """Console errors and uncaught exceptions of one page."""

    def unexpected(self) -> list[str]:
        return [text for text in self if not REFUSED_FETCH.match(text)]


@pytest.fixture
def open_page(browser: Browser, deployment: Deployment):
    """``open_page(viewport=LAPTOP) -> (page, console)``: a fresh browser context (its own
    session storage) on the deployment's API."""
    contexts = []

    def open_(viewport: dict = LAPTOP) -> tuple[Page, Console]:
        context = browser.new_context(base_url=deployment.api, viewport=viewport)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        console = Console()
        page.on("console", lambda m: _record(console, m))
        page.on("pageerror", lambda exc: console.append(f"uncaught: {exc}"))
        return page, console

    yield open_
    for context in contexts:
        context.close()


def _record(console: Console, message: ConsoleMessage) -> None:
    if message.type == "error":
        console.append(message.text)


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def natural_width(page: Page, selector: str) -> int:
    return page.eval_on_selector(selector, "img => img.complete ? img.naturalWidth : 0")


def wait_for_image(page: Page, selector: str) -> None:
    page.wait_for_function(
        "s => { const i = document.querySelector(s); "
        "return i !== null && i.complete && i.naturalWidth > 0 }",
        arg=selector,
    )


@pytest.fixture(scope="module")
def photo() -> bytes:
    return photos.camera_jpeg(1600, 1200, orientation=6)


@pytest.fixture(scope="module")
def finished_job(deployment: Deployment, photo: bytes) -> dict:
    """A succeeded job with per-layer PNGs and arrays, submitted over HTTP."""
    response = requests.post(
        f"{deployment.api}/jobs",
        files={"image": ("IMG_0001.JPG", photo)},
        data={"per_layer": "true", "arrays": "true"},
        headers=AUTH,
        timeout=60,
    )
    assert response.status_code == 202, response.text
    doc = wait_for_job(deployment.api, response.json()["id"], headers=AUTH)
    assert doc["status"] == "succeeded", doc
    return doc


def choose_and_submit(page: Page, files: list[dict], *, token: str | None = TOKEN) -> None:
    page.goto("/")
    if token is not None:
        page.get_by_label("API token").fill(token)
    page.set_input_files("#files", files)
    page.get_by_role("button", name="Submit").click()


def test_a_wrong_or_missing_token_is_refused_with_a_readable_message(open_page, photo):
    page, console = open_page()
    choose_and_submit(page, [_file("IMG_0001.JPG", photo)], token=None)
    expect(page.get_by_role("alert")).to_contain_text("needs a token")
    page.get_by_label("API token").fill("not-the-token")
    page.get_by_role("button", name="Submit").click()
    expect(page.get_by_role("alert")).to_contain_text("The token was refused")
    expect(page.get_by_role("alert")).to_contain_text("[unauthorized]")
    assert page.url.endswith("/")
    screenshot(page, "submit-wrong-token")
    assert console.unexpected() == []


def test_one_photo_opens_its_job_page_and_the_figure_loads(open_page, photo):
    page, console = open_page()
    page.goto("/")
    screenshot(page, "submit")
    choose_and_submit(page, [_file("IMG_0001.JPG", photo)])
    page.wait_for_url(re.compile(r"/ui/jobs/[A-Za-z0-9_-]+$"))
    expect(page.locator("#status")).to_have_text(re.compile("succeeded"), timeout=JOB_DONE_MS)
    wait_for_image(page, "#figure")
    wait_for_image(page, "#input")
    assert natural_width(page, "#figure") > 0 and natural_width(page, "#input") > 0
    expect(page.locator("#weights")).to_contain_text("model=resnet18 · weights: random, seed 0")
    expect(page.locator("#weights")).to_contain_text("precision=exact")
    expect(page.locator("#layers li")).to_have_count(17)
    expect(page.get_by_role("link", name="maps.npz")).to_be_visible()
    expect(page.get_by_role("link", name="manifest.json")).to_be_visible()
    screenshot(page, "job")
    assert console == []


def test_another_model_is_chosen_with_a_mode_it_can_do(open_page, photo):
    page, console = open_page()
    page.goto("/")
    expect(page.locator("#opt-model option")).to_have_text(["resnet18", "vgg16"])
    expect(page.locator("#opt-mode")).to_have_value("chain")
    page.select_option("#opt-model", "vgg16")
    # VGG has no conv chain: the page switches to the true activations.
    expect(page.locator("#opt-mode")).to_have_value("forward")
    # Every choice the page draws is sent with the image, precision included.
    page.select_option("#opt-precision", "fast")
    page.get_by_label("API token").fill(TOKEN)
    page.set_input_files("#files", [_file("IMG_0001.JPG", photo)])
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(re.compile(r"/ui/jobs/[A-Za-z0-9_-]+$"))
    expect(page.locator("#status")).to_have_text(re.compile("succeeded"), timeout=JOB_DONE_MS)
    expect(page.locator("#weights")).to_contain_text("model=vgg16 · weights: random, seed 0")
    expect(page.locator("#weights")).to_contain_text("precision=fast")
    expect(page.locator("#layers li")).to_have_count(13)
    assert console == []


def test_own_weights_are_uploaded_from_the_page_and_used_for_a_job(open_page, photo):
    from worker.compute.model import load_model

    buffer = io.BytesIO()
    torch.save(load_model("random", device="cpu", seed=5).model.state_dict(), buffer)
    page, console = open_page()
    page.goto("/")
    page.get_by_label("API token").fill(TOKEN)
    page.locator("#weights-section summary").click()
    page.select_option("#weights-architecture", "resnet18")
    page.set_input_files("#weights-file", [_file("mine.pt", buffer.getvalue())])
    page.fill("#weights-name", "my-resnet")
    page.get_by_role("button", name="Upload weights").click()
    expect(page.locator("#message")).to_contain_text("Uploaded my-resnet")
    expect(page.locator("#uploads li")).to_contain_text(["my-resnet (resnet18, uploaded)"])
    chosen = page.eval_on_selector("#opt-model", "s => s.value")
    assert re.fullmatch(r"[0-9a-f]{24}", chosen), chosen
    expect(page.locator("#opt-mode")).to_have_value("chain")  # a ResNet keeps the chain
    page.set_input_files("#files", [_file("IMG_0001.JPG", photo)])
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(re.compile(r"/ui/jobs/[A-Za-z0-9_-]+$"))
    expect(page.locator("#status")).to_have_text(re.compile("succeeded"), timeout=JOB_DONE_MS)
    expect(page.locator("#weights")).to_contain_text("my-resnet")

    # A fresh tab with the token lists the upload in the model choices.
    page, _ = open_page()
    page.goto("/")
    page.get_by_label("API token").fill(TOKEN)
    page.get_by_label("API token").dispatch_event("change")
    expect(page.locator(f"#opt-model option[value='{chosen}']")).to_have_count(1)
    assert console == []


def test_a_layer_opens_at_full_resolution_with_values_under_the_cursor(
    open_page, deployment, finished_job
):
    page, console = open_page()
    page.goto("/")
    page.evaluate("t => sessionStorage.setItem('featuremaps-token', t)", TOKEN)
    page.goto(f"/ui/jobs/{finished_job['id']}")
    tile = page.get_by_role("button", name=re.compile(r"^Map of layer layer1\.0\.conv1"))
    expect(tile).to_be_visible(timeout=JOB_DONE_MS)
    tile.click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_be_visible()
    wait_for_image(page, "#viewer-image")
    want = requests.get(
        f"{deployment.api}/jobs/{finished_job['id']}/layers/layer1.0.conv1",
        headers=AUTH,
        timeout=30,
    ).json()
    height, width = want["shape"]
    assert natural_width(page, "#viewer-image") >= width
    expect(page.locator("#probe")).to_contain_text("Move the pointer")

    box = page.locator("#viewer-image").bounding_box()
    row, col = 10, 20
    page.mouse.move(
        box["x"] + (col + 0.5) * box["width"] / width,
        box["y"] + (row + 0.5) * box["height"] / height,
    )
    expect(page.locator("#probe")).to_contain_text(f"row {row}, column {col}:")
    shown = float(page.locator("#probe").get_attribute("data-value"))
    assert shown == pytest.approx(want["data"][row][col], rel=1e-6)

    page.locator("#viewer-image").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#probe")).to_contain_text(f"row {row}, column {col + 1}:")
    screenshot(page, "layer")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert console == []


def test_a_refused_file_shows_the_servers_message(open_page):
    page, console = open_page()
    choose_and_submit(page, [_file("notes.jpg", b"this is a text file, not a photo\n")])
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Not an accepted type")
    expect(alert).to_contain_text("[unsupported_type]")
    screenshot(page, "submit-refused")
    assert console.unexpected() == []
    assert len(console) == 1  # the 415 itself


def test_an_archive_shows_progress_to_100_percent_and_fills_the_gallery(open_page):
    page, console = open_page()
    goods = {f"holiday/IMG_{i:04d}.JPG": photos.camera_jpeg(640, 480, seed=i) for i in range(6)}
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        for name, data in goods.items():
            bundle.writestr(name, data)
        bundle.writestr("holiday/notes.jpg", b"not a photo")
    choose_and_submit(
        page, [{"name": "holiday.zip", "mimeType": "application/zip", "buffer": archive.getvalue()}]
    )
    page.wait_for_url(re.compile(r"/ui/batches/[A-Za-z0-9_-]+$"))
    expect(page.locator("#percent")).to_have_text("100 %", timeout=JOB_DONE_MS)
    assert page.locator("#progress").get_attribute("value") == "100"
    expect(page.locator("#gallery li")).to_have_count(len(goods), timeout=JOB_DONE_MS)
    for index in range(len(goods)):
        wait_for_image(page, f"#gallery li:nth-child({index + 1}) img")
    expect(page.locator("#failed")).to_contain_text("holiday/notes.jpg")
    expect(page.locator("#failed")).to_contain_text("unsupported_type")
    expect(page.get_by_role("link", name="manifest.jsonl")).to_be_visible(timeout=JOB_DONE_MS)
    expect(page.get_by_role("link", name=re.compile("results.zip"))).to_be_visible()
    expect(page.get_by_role("button", name="Cancel batch")).to_be_disabled()
    expect(page.locator("#counts")).to_contain_text("6 succeeded · 1 failed")
    screenshot(page, "batch")
    assert console == []


def test_a_batch_in_two_result_shards_links_both_files_of_each(open_page, deployment):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        for i in range(SHARD_ITEMS + 2):
            bundle.writestr(f"set/{i}.jpg", photos.camera_jpeg(160, 120, seed=40 + i))
    response = requests.post(
        f"{deployment.api}/batches",
        files={"archive": ("nine.zip", archive.getvalue())},
        headers=AUTH,
        timeout=60,
    )
    assert response.status_code == 202, response.text
    page, console = open_page()
    page.goto("/")
    page.evaluate("t => sessionStorage.setItem('featuremaps-token', t)", TOKEN)
    page.goto(response.json()["links"]["page"])
    first = page.get_by_role("link", name="manifest-00001.jsonl (members 1–7)")
    expect(first).to_be_visible(timeout=JOB_DONE_MS)
    for name in (
        "results-00001.zip (figures of members 1–7)",
        "manifest-00002.jsonl (members 8–9)",
        "results-00002.zip (figures of members 8–9)",
    ):
        expect(page.get_by_role("link", name=name)).to_be_visible()
    expect(page.get_by_role("link", name="manifest.jsonl")).to_have_count(0)
    second = page.get_by_role("link", name="results-00002.zip (figures of members 8–9)")
    bundle = zipfile.ZipFile(
        io.BytesIO(requests.get(second.get_attribute("href"), timeout=10).content)
    )
    assert sorted(bundle.namelist()) == ["figures/set/7.jpg.jpg", "figures/set/8.jpg.jpg"]
    assert console == []


def test_a_mac_zip_shows_its_metadata_as_skipped_not_failed(open_page, deployment):
    response = requests.post(
        f"{deployment.api}/batches",
        files={"archive": ("Fotos.zip", finder_zip(photos.camera_jpeg(320, 240, seed=7)))},
        headers=AUTH,
        timeout=60,
    )
    assert response.status_code == 202, response.text
    page, console = open_page()
    page.goto("/")
    page.evaluate("t => sessionStorage.setItem('featuremaps-token', t)", TOKEN)
    page.goto(response.json()["links"]["page"])
    expect(page.locator("#percent")).to_have_text("100 %", timeout=JOB_DONE_MS)
    expect(page.locator("#gallery li")).to_have_count(1, timeout=JOB_DONE_MS)
    expect(page.locator("#gallery")).to_contain_text(NAME)
    expect(page.locator("#skipped li")).to_have_count(2)
    expect(page.locator("#skipped")).to_contain_text("Fotos/.DS_Store")
    expect(page.locator("#skipped")).to_contain_text("AppleDouble")
    expect(page.locator("#failed-section")).to_be_hidden()
    expect(page.locator("#counts")).to_contain_text("1 succeeded · 0 failed")
    expect(page.locator("#counts")).to_contain_text("2 skipped")
    screenshot(page, "batch-skipped")
    assert console == []


def test_a_shared_job_link_asks_for_the_token_and_fits_a_phone(open_page, finished_job):
    page, console = open_page(PHONE)
    page.goto(f"/ui/jobs/{finished_job['id']}")
    expect(page.get_by_role("alert")).to_contain_text("[unauthorized]")
    page.get_by_label("API token").fill(TOKEN)
    page.get_by_role("button", name="Use token").click()
    expect(page.locator("#status")).to_have_text(re.compile("succeeded"))
    wait_for_image(page, "#figure")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone's screen"
    screenshot(page, "job-phone")
    assert console.unexpected() == []


def test_every_page_has_labels_and_alt_text(open_page, finished_job):
    page, console = open_page()
    page.goto("/")
    page.evaluate("t => sessionStorage.setItem('featuremaps-token', t)", TOKEN)
    for path in ("/", f"/ui/jobs/{finished_job['id']}"):
        page.goto(path)
        page.wait_for_load_state("networkidle")
        unlabeled = page.evaluate(
            """() => [...document.querySelectorAll('input, select')]
                .filter(e => !e.labels || e.labels.length === 0).map(e => e.id)"""
        )
        assert unlabeled == [], path
        no_alt = page.evaluate("() => [...document.images].filter(i => !i.alt).map(i => i.src)")
        assert no_alt == [], path
    # The submit form is usable from the keyboard alone: the file chooser is reachable.
    page.goto("/")
    focused = []
    for _ in range(16):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id"))
    assert "files" in focused and "submit" in focused, focused
    assert console == []


def _file(name: str, data: bytes) -> dict:
    return {"name": name, "mimeType": "application/octet-stream", "buffer": data}
