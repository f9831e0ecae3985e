"""The managed services themselves: Redis keeps its data across a restart or a crash (AOF),
two SeaweedFS servers run side by side without a port clash, stop() leaves nothing, and
`python -m stack up` / `down` start and stop exactly the local stack."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from stack.local import fetch_checkpoint, resolve_weights
from stack.services import (
    WEED_MINI_PORT_FLAGS,
    ManagedProcess,
    RedisServer,
    SeaweedS3,
    free_port,
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


def test_weights_choice_is_explicit_and_said(tmp_path: Path) -> None:
    assert resolve_weights({"FEATUREMAPS_WEIGHTS": "random"}) == ("random", None)
    weights, notice = resolve_weights({"TORCH_HOME": str(tmp_path)})  # status, down: no fetch
    assert weights == "random"
    assert notice and "no ImageNet checkpoint found at" in notice and str(tmp_path) in notice
    checkpoint = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    assert resolve_weights({"TORCH_HOME": str(tmp_path)}) == ("imagenet", None)
    state_dict = tmp_path / "w.pth"
    assert resolve_weights({"FEATUREMAPS_WEIGHTS": str(state_dict)}) == (str(state_dict), None)


def test_stack_up_status_down_leaves_nothing_running(
    tmp_path: Path, redis_executable: str, s3_server: SeaweedS3
) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREMAPS_")}
    env.update(
        FEATUREMAPS_STACK_RUN_DIR=str(run_dir),
        FEATUREMAPS_API_PORT=str(free_port()),
        FEATUREMAPS_WEIGHTS="random",
        TORCH_HOME=str(tmp_path / "torch"),
    )

    def stack(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stack", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    up = stack("up", "--wait-workers", "0")
    records = [json.loads(p.read_text()) for p in (run_dir / "pids").glob("*.json")]
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{env['FEATUREMAPS_API_PORT']}" in up.stdout
        assert "weights:  random" in up.stdout and str(run_dir) in up.stdout
        assert {r["name"] for r in records} == {"redis", "s3", "api", "worker"}
        assert all(record_is_alive(r) for r in records)  # detached: they outlive `up`
        state = json.loads((run_dir / "stack.json").read_text())
        assert requests.get(f"{state['api_url']}/healthz", timeout=5).status_code == 200

        again = stack("up", "--wait-workers", "0")
        assert "already running" in again.stdout
        assert stack("status").returncode == 0
    finally:
        down = stack("down")
    assert down.returncode == 0, down.stderr
    assert not any(record_is_alive(r) for r in records)
    assert not list((run_dir / "pids").glob("*.json"))
    assert stack("status").returncode == 1
    assert "nothing was running" in stack("down").stdout


def test_stack_down_then_up_at_once_with_a_keep_alive_client_on_the_api_port(
    tmp_path: Path, redis_executable: str, s3_server: SeaweedS3
) -> None:
    """`make down && make up` while a browser or requests.Session holds a keep-alive
    connection: the API's side of it is left closing (FIN_WAIT_2 / TIME_WAIT) for up to a
    minute, which a plain bind refuses but gunicorn's SO_REUSEADDR bind does not."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREMAPS_")}
    env.update(
        FEATUREMAPS_STACK_RUN_DIR=str(tmp_path / "run"),
        FEATUREMAPS_API_PORT=str(port),
        FEATUREMAPS_WEIGHTS="random",
        TORCH_HOME=str(tmp_path / "torch"),
    )

    def stack(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stack", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    api = f"http://127.0.0.1:{port}"
    session = requests.Session()
    try:
        up = stack("up", "--wait-workers", "0")
        assert up.returncode == 0, up.stdout + up.stderr
        assert session.get(f"{api}/healthz", timeout=5).status_code == 200
        down = stack("down")
        assert down.returncode == 0, down.stderr
        # `down` returns once every process of the stack is gone: nothing listens any more.
        assert not port_is_listening(port)
        # The fault is there: the API's end of the session's connection still holds the port.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))

        again = stack("up", "--wait-workers", "0")
        assert again.returncode == 0, again.stdout + again.stderr
        assert session.get(f"{api}/healthz", timeout=5).status_code == 200
    finally:
        session.close()
        assert stack("down").returncode == 0
    assert not port_is_listening(port)


class _Checkpoints(ThreadingHTTPServer):
    """A local stand-in for torchvision's download server: ``files`` by name."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                data = server.files.get(self.path.rsplit("/", 1)[-1])
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/models/"


def test_the_first_run_fetches_a_checkpoint_with_a_progress_bar_and_checks_its_hash(
    tmp_path: Path, capsys
) -> None:
    data = os.urandom(3 << 20)
    prefix = hashlib.sha256(data).hexdigest()[:8]
    server = _Checkpoints({f"resnet18-{prefix}.pth": data})
    try:
        destination = tmp_path / "hub" / "checkpoints" / f"resnet18-{prefix}.pth"
        fetch_checkpoint(server.url + destination.name, destination)
        assert destination.read_bytes() == data
        progress = capsys.readouterr().err
        assert f"fetching {server.url}{destination.name}" in progress and "3.15M" in progress
        # Bytes that do not match the hash in the file name are refused, and nothing stays.
        wrong = tmp_path / "hub" / "checkpoints" / "resnet18-0123abcd.pth"
        server.files[wrong.name] = data
        with pytest.raises(ValueError, match="does not match its published hash"):
            fetch_checkpoint(server.url + wrong.name, wrong)
        assert sorted(p.name for p in wrong.parent.iterdir()) == [destination.name]
    finally:
        server.shutdown()
        server.server_close()


def test_up_fetches_missing_checkpoints_and_says_why_it_falls_back_to_random(
    tmp_path: Path,
) -> None:
    # torchvision's ResNet-18 checkpoint can only come with its published hash: served here
    # with other bytes, the fetch is refused, said in one notice, and nothing is cached.
    server = _Checkpoints({"resnet18-f37072fd.pth": b"not the real checkpoint"})
    environ = {"TORCH_HOME": str(tmp_path), "FEATUREMAPS_WEIGHTS_BASE_URL": server.url}
    try:
        weights, notice = resolve_weights(environ, fetch=True)
        assert server.requests == ["/models/resnet18-f37072fd.pth"]
        assert weights == "random" and notice is not None
        assert "does not match its published hash" in notice
        assert "using seeded random weights" in notice
        assert not (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").exists()
        # Every enabled architecture's checkpoint is fetched (VGG-16's is asked for too, once
        # ResNet-18's is there).
        checkpoint = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
        checkpoint.write_bytes(b"cached")
        weights, notice = resolve_weights({**environ, "FEATUREMAPS_MODELS": "vgg16"}, fetch=True)
        assert server.requests[-1] == "/models/vgg16-397923af.pth"
        assert weights == "random" and "HTTPError" in (notice or "")
    finally:
        server.shutdown()
        server.server_close()
    # Offline (nothing answers): the same single notice.
    offline = {"TORCH_HOME": str(tmp_path / "t2"), "FEATUREMAPS_WEIGHTS_BASE_URL": server.url}
    weights, notice = resolve_weights(offline, fetch=True)
    assert weights == "random" and "could not be fetched" in (notice or "")
