"""A batch's results in shards, end to end: gunicorn API, a Celery worker, real Redis and S3,
with RESULT_SHARD_ITEMS=4 so that 10 members make 3 shards. Every shard's manifest and zip
are readable, each member is in exactly one manifest and each figure in exactly one zip; the
API, the client and the command line see every shard; a shard written again leaves the same
objects and the batch closed once (one callback)."""

from __future__ import annotations

import io
import json
import uuid
import warnings
import zipfile
from types import SimpleNamespace

import pytest
import requests

from client import Client
from client.cli import main
from shared.batches import Batch, BatchStatus, BatchStore, ItemStatus, NewItem, item_id
from shared.queue import BATCH_QUEUE, FINALIZE_BATCH_SHARD, make_producer
from shared.records import new_record_id
from shared.webhooks import OUTBOX_KEY
from stack.services import wait_until
from tests.helpers import wait_for_batch
from tests.integration.deployment import Deployment
from tests.integration.receiver import Receiver
from tests.integration.test_batches import photo
from tests.integration.test_webhooks import SECRET
from worker.batches import finalize
from worker.batches.finalize import finalize_batch, write_shard

SHARD_ITEMS = 4
# Member order: "dup.jpg" twice in shard 1 (the second gets its item id), once more in
# shard 2 (its zip's own name, unique there); one member that is no image.
MEMBERS = [
    ("dup.jpg", photo(1)),
    ("a/one.jpg", photo(2)),
    ("dup.jpg", photo(3)),
    ("a/two.jpg", photo(4)),
    ("notes.jpg", b"not a photo"),
    ("dup.jpg", photo(5)),
    *((f"b/{i}.jpg", photo(10 + i)) for i in range(4)),
]
GOOD = len(MEMBERS) - 1


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("shards"),
        redis_server,
        s3_server,
        name="shards",
        db=29,
        worker="s1",
        batch_chunk=3,
        result_shard_items=str(SHARD_ITEMS),
        webhook_secret=SECRET,
        webhook_allow_private="true",
    ) as dep:
        yield dep


@pytest.fixture(scope="module")
def store(deployment):
    return deployment.object_store()


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    yield server
    server.close()


def archive() -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of the duplicate names
        with zipfile.ZipFile(buffer, "w") as bundle:
            for name, data in MEMBERS:
                bundle.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def finished(deployment, receiver) -> tuple[dict, str]:
    """The sharded batch once finished, and the receiver path of its callback."""
    path = f"/ok/{uuid.uuid4().hex}"
    response = requests.post(
        f"{deployment.api}/batches",
        files={"archive": ("ten.zip", archive())},
        data={"callback_url": receiver.url(path)},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return wait_for_batch(deployment.api, response.json()["id"]), path


def _shard_objects(store, batch_id: str) -> dict[str, bytes]:
    return {
        key: store.get_bytes(key)
        for key in store.list_keys(f"batches/{batch_id}/")
        if not key.startswith(f"batches/{batch_id}/source.")
    }


def test_ten_members_make_three_shards_each_member_in_exactly_one(deployment, store, finished):
    doc, _ = finished
    batch_id = doc["id"]
    assert doc["status"] == "succeeded", doc
    assert doc["counts"]["succeeded"] == GOOD and doc["counts"]["failed"] == 1
    result = doc["result"]
    assert result["manifest_url"] is None and result["archive_url"] is None
    shards = result["shards"]
    assert [(s["index"], s["first"], s["items"]) for s in shards] == [
        (1, 0, 4),
        (2, 4, 4),
        (3, 8, 2),
    ]
    objects = sorted(_shard_objects(store, batch_id))
    examples = f"batches/{batch_id}/examples"
    assert [key for key in objects if not key.startswith(examples)] == [
        f"batches/{batch_id}/manifest-0000{n}.jsonl" for n in (1, 2, 3)
    ] + [f"batches/{batch_id}/results-0000{n}.zip" for n in (1, 2, 3)]
    # Dataset examples (on by default): one partial top K per result shard, merged once.
    assert {f"{examples}/partial-0000{n}.npz" for n in (1, 2, 3)} <= set(objects)
    assert {f"{examples}/winners.npz", f"{examples}.json"} <= set(objects)
    assert result["examples_url"]

    lines, figures = [], []
    for shard in shards:
        shard_lines = [
            json.loads(line)
            for line in requests.get(shard["manifest_url"], timeout=10).text.splitlines()
        ]
        assert len(shard_lines) == shard["items"]
        positions = [int(line["item_id"].rsplit("-", 1)[1]) for line in shard_lines]
        assert positions == list(range(shard["first"], shard["first"] + shard["items"]))
        bundle = zipfile.ZipFile(io.BytesIO(requests.get(shard["archive_url"], timeout=10).content))
        names = bundle.namelist()
        assert len(names) == len(set(names))  # unique within the shard
        assert sorted(names) == sorted(line["figure"] for line in shard_lines if "figure" in line)
        for name in names:
            assert bundle.read(name)[:2] == b"\xff\xd8"  # a JPEG figure
        lines += shard_lines
        figures += [(shard["index"], name) for name in names]

    assert len(lines) == len(MEMBERS) == doc["counts"]["total"]
    assert [line["name"] for line in lines] == [name for name, _ in MEMBERS]
    assert len({line["item_id"] for line in lines}) == len(MEMBERS)
    succeeded = [line for line in lines if line["status"] == "succeeded"]
    assert len(succeeded) == len(figures) == GOOD
    dup_figures = [(s, n) for s, n in figures if "dup.jpg" in n]
    assert dup_figures == [
        (1, "figures/dup.jpg.jpg"),
        (1, f"figures/dup.jpg.{batch_id}-000002.jpg"),
        (2, "figures/dup.jpg.jpg"),
    ]
    (failed,) = [line for line in lines if line["status"] == "failed"]
    assert failed["name"] == "notes.jpg" and failed["error"]["code"] == "unsupported_type"


def test_inputs_are_released_by_prefix(store, finished):
    batch_id = finished[0]["id"]

    def inputs() -> list[str]:
        return [
            key
            for key in store.list_keys("")
            if key.startswith(
                (
                    f"inputs/{batch_id}-",
                    f"batches/{batch_id}/inputs/",
                    f"batches/{batch_id}/source.",
                )
            )
        ]

    wait_until(lambda: not inputs(), timeout_s=30, what=f"inputs of {batch_id} deleted")
    # The figures stay for the TTL.
    assert len([k for k in store.list_keys(f"results/{batch_id}-") if "feature_maps" in k]) == GOOD


def test_client_and_cli_download_every_shard(deployment, finished, tmp_path, capsys):
    doc, _ = finished
    batch = Client(deployment.api).get_batch(doc["id"])
    assert [s["index"] for s in batch.shards()] == [1, 2, 3]
    assert [line["name"] for line in batch.manifest_lines()] == [name for name, _ in MEMBERS]

    paths = batch.download(tmp_path / "lib")
    manifest = [
        json.loads(line) for line in (tmp_path / "lib" / "manifest.jsonl").read_text().splitlines()
    ]
    assert len(manifest) == len(MEMBERS) and len(paths) == 1 + GOOD
    on_disk = sorted(p.relative_to(tmp_path / "lib").as_posix() for p in paths[1:])
    assert on_disk == sorted(line["figure"] for line in manifest if "figure" in line)
    # The third dup.jpg (shard 2) met a name shard 1 used: renamed as within a shard.
    assert [line["figure"] for line in manifest if line["name"] == "dup.jpg"] == [
        "figures/dup.jpg.jpg",
        f"figures/dup.jpg.{doc['id']}-000002.jpg",
        f"figures/dup.jpg.{doc['id']}-000005.jpg",
    ]
    assert not list((tmp_path / "lib").glob(".results-*"))

    out = tmp_path / "cli"
    code = main(
        ["batch", str(_archive_file(tmp_path)), "--download", str(out), "--api", deployment.api]
    )
    assert code == 0, capsys.readouterr().err
    assert len((out / "manifest.jsonl").read_text().splitlines()) == len(MEMBERS)
    assert len(list(out.rglob("*.jpg"))) == GOOD
    assert "(3 result shards)" in capsys.readouterr().out


def _archive_file(tmp_path):
    path = tmp_path / "ten.zip"
    path.write_bytes(archive())
    return path


def test_a_shard_written_again_leaves_the_same_objects_and_one_close(
    deployment, store, finished, receiver
):
    doc, path = finished
    batch_id = doc["id"]
    (call,) = receiver.wait_for(path, 1)
    assert [s["index"] for s in json.loads(call.body)["result"]["shards"]] == [1, 2, 3]
    wait_until(
        lambda: _doc(deployment, batch_id)["callback_state"] == "delivered",
        timeout_s=30,
        what="the batch's call recorded delivered",
    )
    before = _shard_objects(store, batch_id)

    # Redelivered to a worker after its zip was lost: the last shard's task runs again.
    last = f"batches/{batch_id}/results-00003.zip"
    store.delete_keys([last])
    producer = make_producer(deployment.service_settings())
    producer.send_task(FINALIZE_BATCH_SHARD, args=[batch_id, 3], queue=BATCH_QUEUE)
    wait_until(lambda: store.exists(last), timeout_s=60, what="the redelivered shard rewritten")
    # And run twice more here, with the finalize step that plans them, through the same code.
    ctx = _context(deployment, store)
    assert write_shard(ctx, batch_id, 3) == "succeeded"
    assert write_shard(ctx, batch_id, 1) == "succeeded"
    assert finalize_batch(ctx, batch_id, lambda b, shard: pytest.fail("all are written")) == 3

    assert _shard_objects(store, batch_id) == before
    again = _doc(deployment, batch_id)
    assert (again["status"], again["finished_at"]) == (doc["status"], doc["finished_at"])
    assert [s["index"] for s in again["result"]["shards"]] == [1, 2, 3]
    # Closed once: its call was queued once and delivered; nothing is queued again.
    assert again["callback_state"] == "delivered"
    assert deployment.redis.zscore(OUTBOX_KEY, f"featuremaps:batch:{batch_id}") is None
    assert len(receiver.calls_to(path)) == 1


def _doc(deployment, batch_id: str) -> dict:
    return requests.get(f"{deployment.api}/batches/{batch_id}", timeout=10).json()


def _stored_batch(deployment, store, count: int) -> str:
    """A batch of ``count`` succeeded items recorded straight in Redis, each with a figure
    in storage, and one input pack: what finalizing finds."""
    batches = BatchStore(deployment.redis, ttl_s=3600)
    batch_id = new_record_id()
    batches.create(
        Batch(
            id=batch_id,
            status=BatchStatus.QUEUED,
            options={"format": "jpg"},
            source={"kind": "archive", "name": "x.zip"},
            owner="anonymous",
        )
    )
    batches.begin_expansion(batch_id)
    ids = [item_id(batch_id, i) for i in range(count)]
    batches.add_items(
        batch_id, [NewItem(i, f"{i}.jpg", input_key=f"inputs/{i}/0.jpg") for i in ids]
    )
    batches.end_expansion(batch_id)
    store.put_bytes(f"batches/{batch_id}/inputs/000000.pack", b"packed", "application/octet-stream")
    batches.start_items(batch_id, ids, token="t")
    outcomes = []
    for i in ids:
        figure = f"results/{i}/feature_maps.jpg"
        store.put_bytes(figure, photo(7), "image/jpeg")
        info = {"name": f"{i}.jpg", "figure_key": figure, "manifest_key": f"results/{i}/m.json"}
        outcomes.append((i, ItemStatus.SUCCEEDED, info))
    assert batches.finish_items(batch_id, outcomes)
    return batch_id


def test_a_finalize_redelivered_after_the_closer_died_closes_the_batch(
    deployment, store, monkeypatch
):
    batch_id = _stored_batch(deployment, store, SHARD_ITEMS + 1)
    ctx = _context(deployment, store)
    sent: list[int] = []
    assert finalize_batch(ctx, batch_id, lambda _b, shard: sent.append(shard)) == 2
    assert sent == [1, 2]
    assert write_shard(ctx, batch_id, 1) == "written"

    def died(_ctx, _batch_id):
        raise SystemExit("the worker died after recording its shard")

    monkeypatch.setattr(finalize, "close_batch", died)
    with pytest.raises(SystemExit):
        write_shard(ctx, batch_id, 2)
    monkeypatch.undo()
    batches = BatchStore(deployment.redis, ttl_s=3600)
    assert batches.get(batch_id).result is None  # both shards written, nobody closed it

    # The finalize message comes back: nothing left to write, so it closes the batch.
    assert finalize_batch(ctx, batch_id, lambda _b, shard: pytest.fail(f"{shard} is written")) == 2
    batch = batches.get(batch_id)
    assert batch.status is BatchStatus.SUCCEEDED
    assert [(s["index"], s["first"], s["items"]) for s in batch.result["shards"]] == [
        (1, 0, SHARD_ITEMS),
        (2, SHARD_ITEMS, 1),
    ]
    # KEEP_INPUTS=false: the pack went with the closing, listed by prefix.
    assert list(store.list_keys(f"batches/{batch_id}/inputs/")) == []


def _context(deployment, store) -> SimpleNamespace:
    """What the finalize stage reads of a worker's context."""
    settings = deployment.service_settings()
    return SimpleNamespace(
        settings=settings,
        redis=deployment.redis,
        batches=BatchStore(deployment.redis, ttl_s=settings.job_ttl_s),
        store=store,
    )


def test_a_canceled_batch_writes_its_shards_one_at_a_time_behind_the_turns(deployment, store):
    """A canceled million's 200 result shards must not hold up the next batch: each shard of
    a canceled batch sends the next one, behind the chunk turns waiting."""
    batch_id = _stored_batch(deployment, store, 2 * SHARD_ITEMS + 1)
    BatchStore(deployment.redis, ttl_s=3600).cancel(batch_id)
    ctx = _context(deployment, store)
    sent: list[tuple[int, bool]] = []

    def dispatch(_batch_id: str, shard: int, *, queued_behind: bool = False) -> None:
        sent.append((shard, queued_behind))

    assert finalize_batch(ctx, batch_id, dispatch) == 3
    assert sent == [(1, True)]
    assert write_shard(ctx, batch_id, 1, None, dispatch) == "written"
    assert write_shard(ctx, batch_id, 2, None, dispatch) == "written"
    assert sent == [(1, True), (2, True), (3, True)]
    assert write_shard(ctx, batch_id, 3, None, dispatch) == "canceled"
    assert len(sent) == 3
    batch = BatchStore(deployment.redis, ttl_s=3600).get(batch_id)
    assert batch.status is BatchStatus.CANCELED and len(batch.result["shards"]) == 3
