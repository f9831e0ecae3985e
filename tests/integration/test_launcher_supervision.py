"""`featuremaps-worker --cpu --replicas 2` keeps its workers running: SIGKILL one worker's
Celery main process and the other keeps serving while the launcher starts the dead one again
under the same hostname; no job is lost."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

from shared.heartbeat import live_workers
from shared.queue import WORKER_QUEUES, make_producer
from stack.services import ManagedProcess, pid_alive, wait_until
from tests.helpers import accepted, png, submit_job, wait_for_job
from tests.integration.deployment import Deployment


@pytest.fixture
def deployment(tmp_path: Path, redis_server, s3_server):
    dep = Deployment(
        tmp_path,
        redis_url=redis_server.url.rsplit("/", 1)[0] + "/8",
        s3=s3_server,
        bucket=f"launcher-{uuid.uuid4().hex[:8]}",
    )
    dep.redis.flushdb()
    dep.api = dep.start_api()
    yield dep
    dep.stop()


def test_a_killed_worker_is_restarted_while_the_other_keeps_serving(deployment, tmp_path):
    host = socket.gethostname()
    cpu0, cpu1 = f"cpu0@{host}", f"cpu1@{host}"
    log = tmp_path / "launcher.log"
    launcher = ManagedProcess(
        "launcher",
        [sys.executable, "-m", "worker.launcher", "--cpu", "--replicas", "2"],
        env=deployment.env(),
        log_path=log,
    )
    launcher.start()
    deployment.processes.append(launcher)
    wait_until(
        lambda: {cpu0, cpu1} <= deployment.worker_hostnames(),
        timeout_s=120,
        process=launcher,
        what="both workers' heartbeats",
    )

    def main_pids(hostname: str) -> list[int]:
        return [int(p) for p in re.findall(rf"started {hostname} \(pid (\d+)\)", log.read_text())]

    def pool_pids(hostname: str) -> set[int]:
        """Pids of the processes of ``hostname`` that beat (its pool process loads the model)."""
        return {w["pid"] for w in live_workers(deployment.redis) if w["hostname"] == hostname}

    (killed,) = main_pids(cpu0)
    old_pool = pool_pids(cpu0)
    os.kill(killed, signal.SIGKILL)
    killed_at = time.monotonic()
    during = accepted(submit_job(deployment.api, png(color=(10, 200, 30)), filename="a.png"))

    doc = wait_for_job(deployment.api, during, timeout_s=60)
    assert doc["status"] == "succeeded" and doc["worker"] == cpu1, doc

    wait_until(
        lambda: len(main_pids(cpu0)) == 2 and pool_pids(cpu0) - old_pool,
        timeout_s=60,
        process=launcher,
        what=f"{cpu0} restarted with a fresh heartbeat",
    )
    back_after_s = time.monotonic() - killed_at
    settings = deployment.service_settings()
    producer = make_producer(settings)
    try:
        replies = producer.control.ping(destination=[cpu0, cpu1], timeout=5)
    finally:
        producer.close()
    assert {name for reply in replies for name in reply} == {cpu0, cpu1}
    print(f"{cpu0} beat again and answered ping {back_after_s:.1f}s after the SIGKILL")
    assert back_after_s < 30

    after = [
        accepted(submit_job(deployment.api, png(color=(i, 40, 90)), filename="a.png"))
        for i in range(4)
    ]
    for job_id in after:
        assert wait_for_job(deployment.api, job_id, timeout_s=120)["status"] == "succeeded"
    assert launcher.is_running
    text = log.read_text()
    assert f"{cpu0} (pid {killed}) exited with code -9 (killed by SIGKILL)" in text
    assert "giving up" not in text
    # A job's record succeeds before its task returns (its input is released, then Celery
    # acknowledges the message): the last job's message may still be unacknowledged here.
    wait_until(
        lambda: (
            sum(deployment.redis.llen(q) for q in WORKER_QUEUES.split(",")) == 0
            and deployment.redis.hlen("unacked") == 0
        ),
        timeout_s=30,
        what="empty queues, every message acknowledged",
    )
    # The killed worker's pool process did not linger next to its replacement.
    wait_until(
        lambda: not any(pid_alive(pid) for pid in old_pool),
        timeout_s=30,
        what="the killed worker's pool process to exit",
    )

    launcher.stop(grace_s=30)
    assert launcher.returncode == 0, "a SIGTERM shutdown with every worker stopping cleanly"
