"""Expansion at scale, CI-sized: a 50,000-member zip and tar.gz under a 20 s expansion time
limit and a 0.1 s slice finish by resuming from their checkpoints, with exactly one item per
member; a worker SIGKILLed mid-expansion loses and duplicates nothing; a tar hard link to a
member read by an earlier slice resolves to its bytes.

The members are mostly tiny text files (refused ``unsupported_type`` at expansion, so no model
work) and a few real JPEGs that run through the model."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import pytest
import requests
from PIL import Image

from shared.batches import BatchStore
from stack.services import wait_until
from tests.helpers import accepted, submit_archive, wait_for_batch
from tests.integration.deployment import Deployment
from worker.batches.checkpoints import expansion_key

MEMBERS = 50_000
JPEG_EVERY = 10_000
SHARD = 12_800
# Three result shards of the 50,000 members.
RESULT_SHARD_ITEMS = 20_000


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (seed % 256, 80, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


def member_list(count: int) -> list[tuple[str, bytes]]:
    return [
        (f"set/{i:05d}.jpg", _jpeg(i)) if i % JPEG_EVERY == 7 else (f"set/{i:05d}.txt", b"t%d" % i)
        for i in range(count)
    ]


def make_zip(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("set/", b"")  # a directory: not numbered
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def make_tar_gz(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("expansion"),
        redis_server,
        s3_server,
        name="exp",
        db=22,
        worker="x1",
        expand_soft_time_limit_s=20,
        expand_time_limit_s=25,
        task_soft_time_limit_s=20,
        task_time_limit_s=25,
        visibility_timeout_s=30,
        expand_slice_s=0.1,
        expand_shard_members=SHARD,
        max_archive_members=60_000,
        batch_chunk=8,
        result_shard_items=RESULT_SHARD_ITEMS,
    ) as dep:
        yield dep


def submit(deployment, name: str, data: bytes) -> str:
    return accepted(submit_archive(deployment.api, name, data, timeout_s=120))


def expansion(deployment, batch_id: str) -> dict[str, str]:
    raw = deployment.redis.hgetall(expansion_key(batch_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def check_one_item_per_member(deployment, batch_id: str, members, doc: dict) -> None:
    assert doc["status"] == "succeeded", doc
    jpegs = sum(1 for name, _ in members if name.endswith(".jpg"))
    assert doc["counts"] == {
        "total": len(members),
        "queued": 0,
        "running": 0,
        "succeeded": jpegs,
        "failed": len(members) - jpegs,
        "canceled": 0,
        "skipped": 0,
    }
    store = BatchStore(deployment.redis, ttl_s=3600)
    items = list(store.iter_items(batch_id, page=5000))
    # Exactly one item per member, named after it, in member order.
    assert [(item.id, item.name) for item in items] == [
        (f"{batch_id}-{i:06d}", name) for i, (name, _) in enumerate(members)
    ]
    # The result shards' manifests: one line per member, in member order, across shards.
    shards = doc["result"]["shards"]
    assert len(shards) == -(-len(members) // RESULT_SHARD_ITEMS)
    lines = [
        json.loads(line)
        for shard in shards
        for line in requests.get(shard["manifest_url"], timeout=60).text.splitlines()
    ]
    assert [line["name"] for line in lines] == [name for name, _ in members]


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_50k_members_finish_by_resuming_one_item_each(deployment, kind):
    members = member_list(MEMBERS)
    data = make_zip(members) if kind == "zip" else make_tar_gz(members)
    batch_id = submit(deployment, f"big.{kind}", data)
    doc = wait_for_batch(deployment.api, batch_id, timeout_s=600)
    check_one_item_per_member(deployment, batch_id, members, doc)
    state = expansion(deployment, batch_id)
    shards = -(-MEMBERS // SHARD) if kind == "zip" else 1
    assert state["shards"] == state["shards_done"] == str(shards)
    # Slices of 0.1 s (a shard of 100 blocks takes longer at any speed seen here): handed on
    # to continuations, several times.
    assert int(state["continuations"]) >= 2, state


def test_worker_killed_mid_expansion_loses_and_duplicates_nothing(deployment):
    members = member_list(MEMBERS)
    batch_id = submit(deployment, "killed.tar.gz", make_tar_gz(members))

    def progressed() -> bool:
        cursor = expansion(deployment, batch_id).get("cursor:0")
        return cursor is not None and json.loads(cursor)["index"] >= 4 * 128

    wait_until(progressed, timeout_s=120, what="expansion to commit a few blocks")
    (worker,) = deployment.workers
    worker.kill()
    assert "done:0" not in expansion(deployment, batch_id)  # killed mid-expansion
    deployment.workers = [deployment.start_worker("x2")]
    doc = wait_for_batch(deployment.api, batch_id, timeout_s=600)
    check_one_item_per_member(deployment, batch_id, members, doc)


def test_tar_hard_links_resolve_across_slices(deployment):
    """GNU tar writes a second name of a file as a hard link to the first: links far past
    their target (read by an earlier 0.1 s slice) and one in the target's own block."""
    members = member_list(3_000)
    links = {"set/link-near.jpg": "set/00007.jpg", "set/link-far.jpg": "set/00007.jpg"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.GNU_FORMAT) as archive:
        for i, (name, data) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            if i in (8, 2_990):
                link = tarfile.TarInfo("set/link-near.jpg" if i == 8 else "set/link-far.jpg")
                link.type = tarfile.LNKTYPE
                link.linkname = "set/00007.jpg"
                archive.addfile(link)
    batch_id = submit(deployment, "linked.tar.gz", buffer.getvalue())
    doc = wait_for_batch(deployment.api, batch_id, timeout_s=300)
    assert doc["status"] == "succeeded", doc
    assert doc["counts"]["succeeded"] == 3, doc["counts"]  # the JPEG and its two names
    assert int(expansion(deployment, batch_id)["continuations"]) >= 1
    store = BatchStore(deployment.redis, ttl_s=3600)
    items = {item.name: item for item in store.iter_items(batch_id)}
    target = items["set/00007.jpg"]
    for name in links:
        assert items[name].status.value == "succeeded", items[name]
        assert items[name].info["input_key"] == target.info["input_key"]
        assert items[name].info["input_range"] == target.info["input_range"]
