"""The managed services themselves: Redis keeps its data across a restart or a crash (AOF),
two SeaweedFS servers run side by side without a port clash, and stop() leaves nothing."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from stack.services import (
    WEED_MINI_PORT_FLAGS,
    ManagedProcess,
    RedisServer,
    SeaweedS3,
    pid_alive,
    port_is_listening,
    record_is_alive,
    stop_recorded,
)
from tests.conftest import require_executable


@pytest.fixture
def redis_executable() -> str:
    return require_executable("redis-server", "apt-get install redis-server")


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_redis_keeps_aof_data_across_restart_and_crash(
    tmp_path: Path, redis_executable: str, how: str
) -> None:
    server = RedisServer(tmp_path / "redis", executable=redis_executable)
    server.start()
    try:
        port = server.port
        client = server.client()
        client.set("job:1", "queued")
        client.rpush("queue", "a", "b")
        client.close()
        if how == "restart":
            server.restart()
        else:
            # SIGKILL: the AOF was written (not necessarily fsynced) before each reply, so
            # a process crash loses nothing.
            server.kill()
            assert not server.is_running
            server.start()
        assert server.port == port
        client = server.client()
        assert client.get("job:1") == b"queued"
        assert client.lrange("queue", 0, -1) == [b"a", b"b"]
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        client.close()
    finally:
        server.stop()
    assert not port_is_listening(port)


def test_two_seaweedfs_servers_side_by_side(tmp_path: Path, s3_server: SeaweedS3) -> None:
    first = SeaweedS3(tmp_path / "a", executable=s3_server.executable)
    second = SeaweedS3(tmp_path / "b", executable=s3_server.executable)
    assert set(first.ports) >= set(WEED_MINI_PORT_FLAGS)
    assert not set(first.ports.values()) & set(second.ports.values())
    assert not set(first.ports.values()) & set(s3_server.ports.values())
    try:
        first.start()
        second.start()
        a, b = first.client(), second.client()
        a.make_bucket("only-in-first")
        a.put_object("only-in-first", "k", io.BytesIO(b"1"), 1)
        assert [x.name for x in a.list_buckets()] == ["only-in-first"]
        assert b.list_buckets() == []
    finally:
        first.stop()
        second.stop()
    assert not first.is_running and not second.is_running
    assert not port_is_listening(first.port) and not port_is_listening(second.port)


def test_seaweedfs_restart_keeps_objects(tmp_path: Path, s3_server: SeaweedS3) -> None:
    server = SeaweedS3(tmp_path / "s3", executable=s3_server.executable)
    server.start()
    try:
        server.client().make_bucket("keep")
        server.client().put_object("keep", "k", io.BytesIO(b"kept"), 4)
        server.restart()
        response = server.client().get_object("keep", "k")
        assert response.read() == b"kept"
        response.close()
        response.release_conn()
    finally:
        server.stop()


def test_stop_reaches_children_of_the_process_group(tmp_path: Path) -> None:
    # A leader that ignores SIGTERM and has a child: stop() must still clean up both.
    script = "trap '' TERM; sleep 300 & echo $! > child.pid; wait"
    process = ManagedProcess(
        "group", ["bash", "-c", script], log_path=tmp_path / "group.log", cwd=tmp_path
    )
    process.start()
    child_pid_file = tmp_path / "child.pid"
    for _ in range(50):
        if child_pid_file.exists() and child_pid_file.read_text().strip():
            break
        process.wait(0.1)
    child = int(child_pid_file.read_text())
    assert pid_alive(child)
    process.stop(grace_s=0.5)
    assert not process.is_running
    assert process.wait(5) is not None
    for _ in range(50):
        if not pid_alive(child):
            break
        process.wait(0.1)
    assert not pid_alive(child)


def test_pid_records_stop_only_the_recorded_process(tmp_path: Path) -> None:
    process = ManagedProcess("sleeper", ["sleep", "300"], log_path=tmp_path / "s.log")
    process.start()
    record = process.pid_record()
    assert record_is_alive(record)
    # The same pid with another start time is some other process: left alone.
    assert stop_recorded({**record, "start_time": -1}) is False
    assert process.is_running
    assert stop_recorded(record, grace_s=5) is True
    assert process.wait(5) is not None
    assert not record_is_alive(record)
