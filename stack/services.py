"""Managed local processes: a generic process wrapper, a Redis server and a SeaweedFS S3 server.

These run the real services the stack and the integration tests need, on free loopback ports,
so nothing collides with a Redis or S3 that is already running on the machine.

Every process starts in its own session (hence its own process group), so stopping it also
stops the children it spawned (gunicorn and Celery fork workers). Processes started attached
(the default) are stopped when the Python process that started them exits: an ``atexit`` hook
covers a normal exit and, on Linux, the parent-death signal covers a parent that is killed.
Detached processes (``stack up``) outlive the command that started them by design; their pid
files let ``stack down`` stop exactly them later.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import redis
import urllib3
from minio import Minio
from minio.error import MinioException

DEFAULT_STOP_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1

# Ports handed out by free_port() in this process. The kernel may hand the same ephemeral port
# out twice in a row once the probe socket is closed; remembering them keeps one process from
# giving two services the same port before either has bound it.
_issued_ports: set[int] = set()
# Attached processes still running; stopped at interpreter exit so none outlives its parent.
_attached: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


class ServiceError(RuntimeError):
    """A managed service failed to start, or exited while it was expected to run."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a loopback TCP port nothing listens on, never the same one twice per process."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _issued_ports:
            _issued_ports.add(port)
            return port
    raise ServiceError("could not find a free TCP port after 100 tries")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now: nothing listens there, and a bind with
    SO_REUSEADDR succeeds.

    SO_REUSEADDR because the servers we start (gunicorn, redis-server, SeaweedFS) all bind
    with it: connections their previous run closed first stay in TIME_WAIT for a minute, and
    a plain bind fails on those although the server itself would start fine.
    """
    if port_is_listening(port, host):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_is_listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        if sock.connect_ex((host, port)) != 0:
            return False
        # With nothing listening, the kernel may pick ``port`` itself as the source port and
        # connect the socket to itself (TCP simultaneous open): that is not a listener.
        return sock.getsockname() != sock.getpeername()


def find_executable(name: str) -> str | None:
    """Find ``name`` next to the running interpreter (a venv's bin/) first, then on PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which(name)


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies, if available.

    libc is resolved here, in the parent, so the child only makes one foreign call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return set_pdeathsig


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone.

    Stored next to a pid so that a later ``stop`` never signals an unrelated process that
    happens to have reused the pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after its closing ')' are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0) but is not running anything.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Pids of the running (not zombie) processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def _kill_group_and_wait(pgid: int, timeout_s: float = 5.0) -> None:
    """SIGKILL what is left of a group and wait until none of it runs any more: the leader
    exiting is not enough, forked children (gunicorn's workers) may still hold its listening
    socket for a moment, and ``stack up`` right after ``down`` would find the port taken."""
    _killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """One child process with its own process group, output appended to ``log_path``.

    ``detach=True`` leaves it running when this Python process exits (for ``stack up``);
    otherwise it is stopped at exit and, on Linux, signalled if this process dies. Linux
    sends that signal when the *thread* that started the child ends, so start attached
    processes from a long-lived thread (the main thread, as pytest fixtures do).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        log_path: Path | str | None = None,
        *,
        cwd: Path | str | None = None,
        detach: bool = False,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.env = dict(env) if env is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.cwd = str(cwd) if cwd is not None else None
        self.detach = detach
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} running={self.is_running}>"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def start(self) -> None:
        if self.is_running:
            raise ServiceError(f"{self.name} is already running (pid {self.pid})")
        log = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = self.log_path.open("ab")
        try:
            self._popen = subprocess.Popen(  # nosec B603
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session = own process group: stop() reaches forked children, and a
                # detached stack survives the terminal that started it.
                start_new_session=True,
                preexec_fn=None if self.detach else _parent_death_signal(),
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        if not self.detach:
            _attached.add(self)

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for exit; the return code, or None if still running."""
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        """SIGTERM the leader (so gunicorn/celery shut their workers down cleanly), then
        SIGKILL the whole group if it is still there after ``grace_s``."""
        if self._popen is None:
            return
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGTERM)
            self.wait(grace_s)
        # Also stops children the leader left behind.
        _kill_group_and_wait(self._popen.pid)
        self.wait(5.0)
        _attached.discard(self)

    def kill(self) -> None:
        """SIGKILL the whole process group at once, as a crash would."""
        if self._popen is None:
            return
        _kill_group_and_wait(self._popen.pid)
        self.wait(5.0)
        _attached.discard(self)

    def pid_record(self) -> dict:
        """What ``stop_recorded`` needs to stop this process from another Python process."""
        if self.pid is None:
            raise ServiceError(f"{self.name} was never started")
        return {
            "name": self.name,
            "pid": self.pid,
            "start_time": process_start_time(self.pid),
            "argv": self.argv,
            "log": str(self.log_path) if self.log_path else None,
        }


def record_is_alive(record: Mapping) -> bool:
    """Whether the process a pid record describes is still the one running under that pid."""
    pid = int(record["pid"])
    return pid_alive(pid) and process_start_time(pid) == record.get("start_time")


def stop_recorded(record: Mapping, grace_s: float = DEFAULT_STOP_GRACE_S) -> bool:
    """Stop a process described by :meth:`ManagedProcess.pid_record` (not our child).

    Returns False when it was already gone. The start time check keeps a reused pid safe.
    """
    pid = int(record["pid"])
    if not record_is_alive(record):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    _kill_group_and_wait(pid)
    return True


def write_pid_record(path: Path, process: ManagedProcess) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(process.pid_record(), indent=2) + "\n")


@atexit.register
def _stop_attached_processes() -> None:
    for process in list(_attached):
        process.stop(grace_s=5.0)


def wait_until(
    check: Callable[[], bool],
    *,
    timeout_s: float,
    process: ManagedProcess | None = None,
    what: str,
    interval_s: float = 0.1,
) -> float:
    """Poll ``check`` until it is true; fail early if ``process`` exits. Returns seconds taken."""
    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        if check():
            return time.monotonic() - started
        if process is not None and not process.is_running:
            log = tail(process.log_path) if process.log_path else "(no log)"
            raise ServiceError(
                f"{process.name} exited with code {process.returncode} while waiting for "
                f"{what}; log tail:\n{log}"
            )
        if time.monotonic() >= deadline:
            log = tail(process.log_path) if process and process.log_path else "(no log)"
            raise ServiceError(f"timed out after {timeout_s:.0f}s waiting for {what}; log:\n{log}")
        time.sleep(interval_s)


class RedisServer:
    """A private ``redis-server`` on a loopback port, AOF on, data in ``dir``.

    ``restart()`` keeps the port and the data directory, so the append-only file replays.
    """

    def __init__(
        self,
        dir: Path | str,
        port: int | None = None,
        *,
        appendonly: bool = True,
        executable: str | None = None,
        detach: bool = False,
    ) -> None:
        self.dir = Path(dir).resolve()
        self.port = port or free_port()
        self.appendonly = appendonly
        self.executable = executable or find_executable("redis-server") or "redis-server"
        self.detach = detach
        self.log_path = self.dir / "redis.log"
        self.process = ManagedProcess("redis", self.argv(), log_path=self.log_path, detach=detach)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        return [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            # More than the default 16: each integration test module has its own.
            "--databases", "32",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--maxmemory-policy", "noeviction",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, db=db, socket_timeout=2, socket_connect_timeout=2
        )

    def ping(self) -> bool:
        client = self.client()
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self, timeout_s: float = 20.0) -> float:
        """Start and wait until PING answers; returns the seconds it took."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process.start()
        return wait_until(
            self.ping, timeout_s=timeout_s, process=self.process, what=f"redis on {self.port}"
        )

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        self.process.stop(grace_s)

    def kill(self) -> None:
        self.process.kill()

    def restart(self, timeout_s: float = 20.0) -> float:
        self.stop()
        return self.start(timeout_s)

    @property
    def is_running(self) -> bool:
        return self.process.is_running


# Every port flag `weed mini -h` lists (seaweedfs 4.x). Each gets its own free port so that
# two instances, or one next to a developer's own SeaweedFS, never collide.
WEED_MINI_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "volume.port.public",
    "filer.port",
    "filer.port.grpc",
    "filer.port.public",
    "s3.port",
    "s3.port.grpc",
    "s3.port.https",
    "s3.port.iceberg",
    "s3.port.lance",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "debug.port",
    "s3.debug.port",
    "metricsPort",
    "s3.metricsPort",
)
# weed's embedded maintenance worker dials admin.port + 10000 whatever admin.port.grpc says,
# so the admin gRPC port is placed exactly there.
_GRPC_PORT_OFFSET = 10_000
# Unix socket paths are limited to 107 bytes; longer run dirs keep weed's /tmp defaults
# (which are keyed by port, so they do not collide either).
_MAX_SOCKET_PATH = 100


def _admin_port_pair() -> tuple[int, int]:
    for _ in range(200):
        port = free_port()
        grpc = port + _GRPC_PORT_OFFSET
        if grpc <= 65535 and grpc not in _issued_ports and port_is_free(grpc):
            _issued_ports.add(grpc)
            return port, grpc
    raise ServiceError("could not find a free admin port pair for SeaweedFS")


class SeaweedS3:
    """A private SeaweedFS (``weed mini``) serving S3 on a loopback port, data in ``dir``.

    Credentials are given through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, which ``weed
    mini`` turns into its admin identity. Volumes are kept small and plentiful: SeaweedFS
    gives every bucket its own volumes, and its default (free disk / 1 GiB) runs out after a
    few dozen buckets on a small disk.
    """

    def __init__(
        self,
        dir: Path | str,
        port: int | None = None,
        *,
        access_key: str = "featuremaps",
        secret_key: str = "featuremaps-secret",
        region: str = "us-east-1",
        executable: str | None = None,
        volume_size_limit_mb: int = 64,
        max_volumes: int = 1000,
        detach: bool = False,
    ) -> None:
        self.dir = Path(dir).resolve()
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.executable = executable or find_executable("weed") or "weed"
        self.volume_size_limit_mb = volume_size_limit_mb
        self.max_volumes = max_volumes
        self.ports: dict[str, int] = {}
        admin, admin_grpc = _admin_port_pair()
        for flag in WEED_MINI_PORT_FLAGS:
            self.ports[flag] = free_port()
        self.ports["admin.port"], self.ports["admin.port.grpc"] = admin, admin_grpc
        if port is not None:
            self.ports["s3.port"] = port
        self.log_path = self.dir / "weed.log"
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
        }
        self.process = ManagedProcess(
            "s3", self.argv(), env=env, log_path=self.log_path, cwd=self.dir, detach=detach
        )

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        data = self.dir / "data"
        argv = [
            self.executable,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-webdav=false",
            "-admin.ui=false",
            # No network access is assumed, and a dev server has nothing to report.
            "-master.telemetry=false",
            # weed's graceful stop waits for open HTTP connections to go idle, up to this
            # long; the default (30 s) turned every stop after a multipart upload into a
            # SIGKILL at the grace limit.
            "-idleTimeout=3",
            # The pre-stop pause tells other nodes to stop writing here; there are none.
            "-volume.preStopSeconds=0",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.max={self.max_volumes}",
        ]
        argv += [f"-{flag}={port}" for flag, port in self.ports.items()]
        if len(str(self.dir / "filer.sock")) <= _MAX_SOCKET_PATH:
            argv += [
                f"-filer.localSocket={self.dir / 'filer.sock'}",
                f"-s3.localFilerSocket={self.dir / 'filer.sock'}",
                f"-s3.localSocket={self.dir / 's3.sock'}",
            ]
        return argv

    def client(self, *, timeout_s: float = 5.0) -> Minio:
        """A minio client for this server with short timeouts and no retries."""
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0, status=0),
        )
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=self.region,
            http_client=http,
        )

    def answers_s3(self) -> bool:
        client = self.client(timeout_s=2.0)
        try:
            client.list_buckets()
        except (MinioException, urllib3.exceptions.HTTPError, OSError):
            # Not listening yet, or listening but not yet serving S3 (5xx, 403 before the
            # identity is loaded): keep polling.
            return False
        return True

    def volumes_registered(self) -> bool:
        """Whether the volume server has told the master about every volume on disk.

        After a restart the S3 gateway answers before that heartbeat has arrived, and reads
        of existing objects fail with InternalError until it has.
        """
        on_disk = len(list((self.dir / "data").glob("*.dat")))
        url = f"http://127.0.0.1:{self.ports['master.port']}/dir/status"
        try:
            # Bandit B310: the URL is built just above, http:// to our own loopback master.
            with urllib.request.urlopen(url, timeout=2) as response:  # nosec B310
                topology = json.load(response)["Topology"]
        except (OSError, ValueError, KeyError):
            return False
        nodes = [
            node
            for center in topology.get("DataCenters") or []
            for rack in center.get("Racks") or []
            for node in rack.get("DataNodes") or []
        ]
        return bool(nodes) and sum(node.get("Volumes", 0) for node in nodes) >= on_disk

    def is_ready(self) -> bool:
        return self.answers_s3() and self.volumes_registered()

    def start(self, timeout_s: float = 60.0) -> float:
        """Start and wait until an authenticated S3 call works and every volume on disk is
        registered; returns the seconds it took."""
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.process.start()
        return wait_until(
            self.is_ready,
            timeout_s=timeout_s,
            process=self.process,
            what=f"SeaweedFS S3 on {self.endpoint}",
            interval_s=0.2,
        )

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        self.process.stop(grace_s)

    def kill(self) -> None:
        self.process.kill()

    def restart(self, timeout_s: float = 60.0) -> float:
        self.stop()
        return self.start(timeout_s)

    @property
    def is_running(self) -> bool:
        return self.process.is_running
