"""Fair share with real workers (gunicorn API, one Celery worker slot, redis-server, S3): a
small batch is not stuck behind a large one, each token gets an equal share of chunks
whatever its number of batches, and a canceled batch costs nothing. The scheduler's scripts
alone are tested in test_schedule.py; the wall times printed here are recorded in
docs/benchmarks.md ("Fair share")."""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np
import pytest
import requests
from PIL import Image

from shared.batches import batch_key
from shared.queue import BATCH_QUEUE, broker_options, queue_keys
from shared.schedule import todo_key
from stack.services import wait_until
from tests.helpers import accepted, submit_archive, wait_for_batch
from tests.integration.deployment import Deployment

CHUNK = 2
WINDOW = 4
TOKENS = {"alice": "alice-secret-token", "bob": "bob-secret-token"}


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("fair"),
        redis_server,
        s3_server,
        name="fair",
        db=23,
        worker="fair1",
        batch_chunk=CHUNK,
        batch_window=WINDOW,
        api_tokens=",".join(f"{name}:{token}" for name, token in TOKENS.items()),
    ) as dep:
        yield dep


def _auth(owner: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[owner]}"}


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def _zip(seeds: range, *, same: bytes | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for seed in seeds:
            archive.writestr(f"p/{seed:06d}.jpg", same if same is not None else _photo(seed))
    return buffer.getvalue()


def _submit(api: str, owner: str, archive: bytes) -> str:
    # No dataset examples: these tests are about the chunks' turns, not the closing steps.
    return accepted(submit_archive(api, "photos.zip", archive, headers=_auth(owner), examples="0"))


def _claimed(dep: Deployment, batch_id: str) -> int:
    return int(dep.redis.hget(batch_key(batch_id), "chunks_claimed") or 0)


def _doc(api: str, owner: str, batch_id: str) -> dict:
    response = requests.get(f"{api}/batches/{batch_id}", headers=_auth(owner), timeout=10)
    response.raise_for_status()
    return response.json()


def _cancel(api: str, owner: str, batch_id: str) -> None:
    response = requests.delete(f"{api}/batches/{batch_id}", headers=_auth(owner), timeout=30)
    assert response.status_code in (202, 409), response.text  # 409: it had ended already


def test_a_small_batch_is_not_stuck_behind_a_large_one(deployment):
    api = deployment.api
    started = time.monotonic()
    wait_for_batch(api, _submit(api, "bob", _zip(range(10))), headers=_auth("bob"))
    alone_s = time.monotonic() - started

    large = _submit(api, "alice", _zip(range(1000, 1300)))
    wait_until(
        lambda: _doc(api, "alice", large)["counts"]["succeeded"] >= 20,
        timeout_s=120,
        what="the large batch running",
    )
    before = _claimed(deployment, large)
    started = time.monotonic()
    small = _submit(api, "bob", _zip(range(2000, 2010)))
    done = wait_for_batch(api, small, headers=_auth("bob"))
    behind_s = time.monotonic() - started
    during = _claimed(deployment, large) - before
    large_doc = _doc(api, "alice", large)
    _cancel(api, "alice", large)

    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 10
    # The small batch's 5 chunks alternated with the large one's: the large batch got at most
    # one turn per small-batch chunk, plus the one in hand when the small batch arrived and
    # those claimed while its expansion and closing steps ran.
    assert during <= 10 // CHUNK + 3, during
    assert large_doc["counts"]["queued"] > 150, large_doc["counts"]
    print(
        f"\n10-item batch behind a 300-item one: {behind_s:.1f}s vs {alone_s:.1f}s alone "
        f"({behind_s / alone_s:.2f}x); chunks of the large batch meanwhile: {during}"
    )


def test_each_token_gets_an_equal_share_whatever_its_number_of_batches(deployment):
    api = deployment.api
    alice = [_submit(api, "alice", _zip(range(3000 + 100 * n, 3040 + 100 * n))) for n in range(3)]
    bob = _submit(api, "bob", _zip(range(4000, 4040)))
    chunks = 40 // CHUNK
    samples = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        counts = [_claimed(deployment, b) for b in alice], _claimed(deployment, bob)
        samples.append(counts)
        if counts[1] >= chunks:
            break
        time.sleep(0.05)
    # From the first moment all four had a chunk claimed until bob's last chunk was claimed,
    # the two tokens' claims grew alike (alice's spread over her three batches).
    first = next(s for s in samples if min(s[0]) >= 1 and s[1] >= 1)
    last = samples[-1]
    alice_share = sum(last[0]) - sum(first[0])
    bob_share = last[1] - first[1]
    for batch_id in alice:
        _cancel(api, "alice", batch_id)
    wait_for_batch(api, bob, headers=_auth("bob"))
    print(f"\nchunks claimed while all four ran: alice (3 batches) {alice_share}, bob {bob_share}")
    assert bob_share >= chunks // 2, samples
    assert abs(alice_share - bob_share) <= 2, (first, last)
    per_batch = [b - a for a, b in zip(first[0], last[0], strict=True)]
    assert max(per_batch) - min(per_batch) <= 2, per_batch


def test_a_canceled_large_batch_costs_nothing(deployment):
    api = deployment.api
    redis = deployment.redis
    huge = _submit(api, "alice", _zip(range(20_000), same=_photo(7)))
    wait_until(
        lambda: redis.hget(batch_key(huge), "expanded") == b"1",
        timeout_s=240,
        what="20,000 members expanded",
    )
    _cancel(api, "alice", huge)
    claimed_at_cancel = _claimed(deployment, huge)
    # Nothing of the canceled batch waits: no chunk in the scheduler, and no more turn
    # messages in the batch queue than the window (turns name no batch).
    assert not redis.exists(todo_key(huge))
    options = broker_options(deployment.service_settings())
    waiting = sum(redis.llen(key) for key in queue_keys(BATCH_QUEUE, options))
    assert waiting <= WINDOW + 1, waiting  # the turns, and at most the closing task
    started = time.monotonic()
    following = _submit(api, "bob", _zip(range(5000, 5004)))
    wait_until(
        lambda: _doc(api, "bob", following)["counts"]["succeeded"] >= 1,
        timeout_s=120,
        what="the next batch's first item",
    )
    first_item_s = time.monotonic() - started
    wait_for_batch(api, following, headers=_auth("bob"))
    canceled = wait_for_batch(api, huge, headers=_auth("alice"))
    assert canceled["status"] == "canceled"
    assert canceled["counts"]["queued"] == 0 and canceled["counts"]["running"] == 0
    # at most the chunk being claimed when the cancel landed
    assert _claimed(deployment, huge) - claimed_at_cancel <= 1
    print(f"\ncanceled 20,000 items; the next batch's first item in {first_item_s:.1f}s")
