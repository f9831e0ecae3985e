"""Metrics through the real service: jobs and a batch go through gunicorn, Redis and a real
Celery worker process, and the worker's own /metrics (FEATUREMAPS_WORKER_METRICS_PORT, served
by its pool process) counts them, with stage histograms that add up to the timings the jobs
recorded; the API's queue gauges and GET /backlog follow a real backlog, priority sub-queues
included.
Redis db 12."""

from __future__ import annotations

import io
import subprocess
import sys
import time
import zipfile

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from shared.jobs import Job, JobStatus, JobStore, new_job_id
from shared.options import JobOptions
from shared.queue import JOBS_QUEUE, PRIORITY_SEP, RENDER_JOB, make_producer
from stack.services import free_port, wait_until
from tests.helpers import accepted, png, submit_job, wait_for_batch, wait_for_job
from tests.integration.deployment import Deployment

CHUNK = 2
PIPELINE_STAGES = ("decode", "model", "reduce", "render", "encode")


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("metrics"),
        redis_server,
        s3_server,
        name="metrics",
        db=12,
        batch_chunk=CHUNK,
        worker_metrics_port=free_port(),
    ) as dep:
        yield dep


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics page."""
    text = requests.get(url, timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def worker_metrics(dep: Deployment) -> dict[tuple[str, tuple], float]:
    return scrape(f"http://127.0.0.1:{dep.settings['worker_metrics_port']}/metrics")


def stage(samples: dict, suffix: str, name: str) -> float:
    return samples[(f"featuremaps_worker_stage_duration_seconds_{suffix}", (("stage", name),))]


def test_jobs_through_a_real_worker_are_counted_and_timed(deployment):
    jobs = JobStore(deployment.redis, ttl_s=3600)
    before = worker_metrics(deployment)
    ids = [
        accepted(submit_job(deployment.api, png(color=(40 * n, 90, 200)), filename="a.png"))
        for n in range(3)
    ]
    for job_id in ids:
        assert wait_for_job(deployment.api, job_id)["status"] == "succeeded"
    # One the worker fails: bytes that pass as a JPEG by their magic but do not decode.
    store = deployment.object_store()
    bad = new_job_id()
    store.put_bytes(f"inputs/{bad}/0.jpg", b"\xff\xd8\xff\xe0garbage", "image/jpeg")
    jobs.create(
        Job(
            id=bad,
            status=JobStatus.QUEUED,
            options=JobOptions().to_dict(),
            input_key=f"inputs/{bad}/0.jpg",
        )
    )
    make_producer(deployment.service_settings()).send_task(RENDER_JOB, args=[bad], queue=JOBS_QUEUE)
    failed = wait_for_job(deployment.api, bad)
    assert failed["status"] == "failed"

    after = worker_metrics(deployment)

    def grew(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert grew("featuremaps_worker_images_processed_total", (("kind", "job"),)) == 3
    code = failed["error"]["code"]
    assert grew("featuremaps_worker_images_failed_total", (("code", code), ("kind", "job"))) == 1
    # Every stage of the three good jobs was observed once, the bad job's fetch too ...
    for name in (*PIPELINE_STAGES, "upload"):
        assert stage(after, "count", name) - stage(before, "count", name) == 3
    assert stage(after, "count", "fetch") - stage(before, "count", "fetch") == 4
    # ... and the pipeline stages add up to what the jobs recorded (rounded to 0.01 ms).
    for name in PIPELINE_STAGES:
        recorded = sum(jobs.get(i).timings[f"{name}_ms"] for i in ids) / 1000
        observed = stage(after, "sum", name) - stage(before, "sum", name)
        assert observed == pytest.approx(recorded, abs=1e-4)
    # The model stays resident: loaded once by this process.
    assert after[("featuremaps_worker_model_loads_total", ())] == 1


def test_a_batch_is_counted_per_image_and_per_chunk(deployment):
    before = worker_metrics(deployment)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for n in range(3):
            archive.writestr(f"img{n}.png", png(color=(10, 70 * n, 30)))
        archive.writestr("notes.txt", b"not an image")
    response = requests.post(
        f"{deployment.api}/batches", files={"archive": ("b.zip", buffer.getvalue())}, timeout=30
    )
    assert response.status_code == 202, response.text
    doc = wait_for_batch(deployment.api, response.json()["id"])
    assert doc["counts"]["succeeded"] == 3, doc
    after = worker_metrics(deployment)

    def grew(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert grew("featuremaps_worker_images_processed_total", (("kind", "batch"),)) == 3
    # 3 images (the text file fails at expansion, before any chunk) in chunks of 2: 2 + 1.
    assert grew("featuremaps_worker_chunk_images_count") == 2
    assert grew("featuremaps_worker_chunk_images_sum") == 3
    assert stage(after, "count", "model") - stage(before, "count", "model") == 3


def test_the_liveness_check_sees_this_hosts_worker_heartbeat(deployment):
    def check(redis_url: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "worker.health"],
            env=deployment.env(redis_url=redis_url),
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert check(deployment.redis_url).returncode == 0
    # A Redis without this host's heartbeat (db 13, flushed): not alive.
    empty = deployment.redis_url.rsplit("/", 1)[0] + "/13"
    deployment.redis.from_url(empty).flushdb()
    dead = check(empty)
    assert dead.returncode == 1
    assert "no worker on" in dead.stderr
    # Redis unreachable: not the worker's fault, so no restart.
    assert check("redis://127.0.0.1:1/0").returncode == 0


def test_the_queue_gauges_follow_a_real_backlog(deployment):
    def gauges() -> dict:
        return scrape(f"{deployment.api}/metrics")

    depth = ("featuremaps_queue_depth", (("queue", "jobs"),))
    age = ("featuremaps_queue_oldest_age_seconds", (("queue", "jobs"),))
    assert gauges()[depth] == 0
    assert gauges()[age] == 0
    # With no worker taking them, messages wait.
    for process in deployment.workers:
        process.stop()
    ids = [
        accepted(submit_job(deployment.api, png(color=(0, 0, 50 * n)), filename="a.png"))
        for n in range(2)
    ]
    # A message with a priority goes to its sub-queue; the gauge counts it too.
    make_producer(deployment.service_settings()).send_task(
        RENDER_JOB, args=[new_job_id()], queue=JOBS_QUEUE, priority=9
    )
    assert deployment.redis.llen(f"{JOBS_QUEUE}{PRIORITY_SEP}9") == 1
    assert deployment.redis.llen(JOBS_QUEUE) == 2
    assert gauges()[depth] == 3
    # What KEDA reads: the same messages, and nothing else waiting or in flight.
    backlog = requests.get(f"{deployment.api}/backlog", timeout=10).json()
    assert backlog["waiting_jobs"] == 3 and backlog["for_workers"] == 3, backlog
    time.sleep(1.0)
    waited = gauges()[age]
    assert waited >= 1.0
    # A worker comes and takes them all.
    deployment.workers = [deployment.start_worker("w2")]
    for job_id in ids:
        assert wait_for_job(deployment.api, job_id)["status"] == "succeeded"
    wait_until(lambda: gauges()[depth] == 0, timeout_s=30, what="the jobs queue to drain")
    assert gauges()[age] == 0
    assert gauges()[("featuremaps_workers_alive", ())] >= 1
    wait_until(
        lambda: requests.get(f"{deployment.api}/backlog", timeout=10).json()["for_workers"] == 0,
        timeout_s=30,
        what="an empty backlog: KEDA may scale to zero",
    )
