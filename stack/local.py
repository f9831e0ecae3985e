"""The whole service on one machine without Docker: redis-server, SeaweedFS S3, the API under
gunicorn and CPU workers, with every pid, log and data file in one run directory.

    run/
      stack.json            what is running: URLs, ports, weights, start order
      pids/<name>.json      pid + kernel start time of each process (for `stack down`)
      logs/<name>.log       api and worker output
      redis/  s3/           data (kept across down/up) and the servers' own logs

:class:`LocalStack` takes an explicit :class:`StackConfig`; ``stack/__main__.py`` builds one
from the environment. ``stop()`` stops what this object started; :func:`stop_run_dir` stops
what a run directory's pid files name, which is how ``stack down`` undoes a detached ``up``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.settings import Settings
from shared.storage import ObjectStore
from stack.commands import API_CONFIG, answers, api_command, wait_for_api
from stack.services import (
    ManagedProcess,
    RedisServer,
    SeaweedS3,
    ServiceError,
    port_is_free,
    record_is_alive,
    stop_recorded,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESNET18_CHECKPOINT = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1
STATE_FILE = "stack.json"
# Where torchvision publishes its checkpoints (FEATUREMAPS_WEIGHTS_BASE_URL overrides it: a
# mirror, or a test's local server).
WEIGHTS_BASE_URL = "https://download.pytorch.org/models/"
FETCH_TIMEOUT_S = 30.0


def torch_home(environ: Mapping[str, str]) -> Path:
    """Where torch.hub keeps its cache, by torch's own rules."""
    if environ.get("TORCH_HOME"):
        return Path(environ["TORCH_HOME"]).expanduser()
    cache = environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(cache) / "torch"


def resolve_weights(environ: Mapping[str, str], *, fetch: bool = False) -> tuple[str, str | None]:
    """The weights the stack's workers should load, and a notice to show when it is not the
    ImageNet default (the design forbids silent fallbacks, so the choice is always said).

    FEATUREMAPS_WEIGHTS wins; otherwise ``imagenet`` where torchvision's checkpoints of every
    enabled architecture (``FEATUREMAPS_MODELS``, ResNet-18 always) are cached. With
    ``fetch`` (``stack up`` and ``demo``, as the article's ``pretrained=True`` did on first
    use) missing ones are downloaded into that cache first, with a progress bar, from
    ``FEATUREMAPS_WEIGHTS_BASE_URL`` (torchvision's own by default), each checked against the
    hash in its file name. Else seeded ``random`` weights, said in one notice.
    """
    explicit = environ.get("FEATUREMAPS_WEIGHTS", "").strip()
    if explicit:
        if explicit in ("imagenet", "random"):
            return explicit, None
        # A state_dict path: absolute, because the workers run from the project root.
        return str(Path(explicit).expanduser().resolve()), None
    checkpoints = torch_home(environ) / "hub" / "checkpoints"
    missing = [name for name in checkpoint_files(environ) if not (checkpoints / name).is_file()]
    if not missing:
        return "imagenet", None
    problem = "not fetched (this command does not download)"
    if fetch:
        base = environ.get("FEATUREMAPS_WEIGHTS_BASE_URL", "").strip() or WEIGHTS_BASE_URL
        problem = fetch_checkpoints(base, missing, checkpoints)
        if problem is None:
            return "imagenet", None
    return "random", (
        f"no ImageNet checkpoint found at {checkpoints / missing[0]}, and it could not be "
        f"fetched ({problem}); using seeded random weights (figures will show untrained "
        "filters). Place torchvision's checkpoint there (offline: copy it from a machine "
        "with internet), or set FEATUREMAPS_WEIGHTS."
    )


def checkpoint_files(environ: Mapping[str, str]) -> list[str]:
    """The file names of the ImageNet checkpoints of the enabled architectures."""
    names = [n.strip() for n in environ.get("FEATUREMAPS_MODELS", "").split(",") if n.strip()]
    others = [name for name in names if name != "resnet18"]
    files = [RESNET18_CHECKPOINT]
    if not others:  # the default: no torchvision import for `stack status` or `down`
        return files
    from urllib.parse import urlparse

    from torchvision.models import get_model_weights

    for name in others:
        try:
            url = get_model_weights(name)["IMAGENET1K_V1"].url
        except (KeyError, ValueError):
            continue  # not an architecture: the workers refuse it with the reason
        files.append(Path(urlparse(url).path).name)
    return files


def fetch_checkpoints(base_url: str, names: list[str], directory: Path) -> str | None:
    """Download each of ``names`` from ``base_url`` into ``directory``; None when all came,
    else why the first one did not (nothing half-written is left)."""
    for name in names:
        try:
            fetch_checkpoint(base_url.rstrip("/") + "/" + name, directory / name)
        except (OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
    return None


def fetch_checkpoint(url: str, destination: Path, *, hash_prefix: str | None = None) -> None:
    """``url`` into ``destination`` with a progress bar on stderr, checked against the
    sha256 prefix torchvision puts in its file names (``resnet18-f37072fd.pth``) or
    ``hash_prefix``; written to a temporary name and renamed, so a failure leaves nothing.
    Raises OSError (unreachable, HTTP error) or ValueError (hash mismatch)."""
    import hashlib
    import re
    import urllib.request

    from tqdm import tqdm

    expected = hash_prefix or re.search(r"-([a-f0-9]{6,})\.", destination.name).group(1)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    digest = hashlib.sha256()
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"{url!r} is not an http(s) URL (FEATUREMAPS_WEIGHTS_BASE_URL)")
    print(f"fetching {url} into {destination}", file=sys.stderr, flush=True)
    try:
        # The scheme is checked just above (http or https only).
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as answer:  # nosec B310
            total = int(answer.headers.get("Content-Length") or 0) or None
            with (
                partial.open("wb") as out,
                tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr) as bar,
            ):
                while block := answer.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if not digest.hexdigest().startswith(expected):
            raise ValueError(
                f"{url} does not match its published hash (sha256 {expected}…, got "
                f"{digest.hexdigest()[:12]}…)"
            )
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)


@dataclass
class StackConfig:
    """Everything the local stack needs; ports left as None are picked free at start."""

    run_dir: Path
    weights: str = "random"
    api_port: int = 8000
    redis_port: int | None = None
    s3_port: int | None = None
    workers: int = 1
    s3_access_key: str = "featuremaps"
    s3_secret_key: str = "featuremaps-secret"
    s3_bucket: str = "featuremaps"
    s3_region: str = "us-east-1"
    # host:port of an S3 server to use instead of starting SeaweedFS.
    external_s3_endpoint: str | None = None
    # host:port clients outside use for presigned URLs; default: the S3 endpoint itself.
    s3_public_endpoint: str | None = None
    # Environment the API and workers inherit (FEATUREMAPS_API_TOKENS and the like pass
    # through); the stack's own FEATUREMAPS_* values are laid over it.
    base_env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 90.0


class LocalStack:
    """Starts and stops the local stack described by a :class:`StackConfig`.

    ``detach=True`` (``stack up``) leaves the processes running after this Python process
    exits; otherwise they are stopped with it.
    """

    def __init__(
        self,
        config: StackConfig,
        *,
        detach: bool = False,
        say: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir).resolve()
        self.detach = detach
        self.say = say
        self.redis: RedisServer | None = None
        self.s3: SeaweedS3 | None = None
        self.processes: list[ManagedProcess] = []
        self.workers: ManagedProcess | None = None
        self.state: dict = {}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.config.api_port}"

    def start(self) -> dict:
        """Start everything, wait until the API answers /healthz; returns the state written
        to ``stack.json``. On any failure what was started is stopped again."""
        config = self.config
        if is_up(self.run_dir):
            raise ServiceError(f"a stack is already running from {self.run_dir}; stop it first")
        for name, port in (
            ("FEATUREMAPS_API_PORT", config.api_port),
            ("FEATUREMAPS_STACK_REDIS_PORT", config.redis_port),
            ("FEATUREMAPS_STACK_S3_PORT", config.s3_port),
        ):
            if port is not None and not port_is_free(port):
                raise ServiceError(f"port {port} ({name}) is already in use; choose another")
        (self.run_dir / "pids").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            return self._start_all()
        except BaseException:
            self.stop()
            raise

    def _start_all(self) -> dict:
        config = self.config
        self.redis = RedisServer(self.run_dir / "redis", config.redis_port, detach=self.detach)
        self.say(f"starting redis-server on 127.0.0.1:{self.redis.port} ...")
        self.redis.start()
        self._record(self.redis.process)
        s3_endpoint = config.external_s3_endpoint or self._start_s3()
        settings = Settings(
            redis_url=self.redis.url,
            s3_endpoint=s3_endpoint,
            s3_access_key=config.s3_access_key,
            s3_secret_key=config.s3_secret_key,
            s3_bucket=config.s3_bucket,
            s3_region=config.s3_region,
            s3_public_endpoint=config.s3_public_endpoint or s3_endpoint,
            weights=config.weights,
        )
        store = ObjectStore.from_settings(settings)
        store.ensure_bucket()
        store.close()
        self._start_services(settings)
        self.state = {
            "api_url": self.api_url,
            "redis_url": self.redis.url,
            "s3_endpoint": s3_endpoint,
            "s3_public_endpoint": settings.s3_public_endpoint,
            "s3_bucket": config.s3_bucket,
            "weights": config.weights,
            "workers": config.workers,
            "run_dir": str(self.run_dir),
            "logs": {p.name: str(p.log_path) for p in self.processes},
            "order": [p.name for p in self.processes],
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "detached": self.detach,
        }
        (self.run_dir / STATE_FILE).write_text(json.dumps(self.state, indent=2) + "\n")
        return self.state

    def _start_s3(self) -> str:
        """Start the stack's own SeaweedFS; returns its endpoint."""
        config = self.config
        self.s3 = SeaweedS3(
            self.run_dir / "s3",
            config.s3_port,
            access_key=config.s3_access_key,
            secret_key=config.s3_secret_key,
            region=config.s3_region,
            detach=self.detach,
        )
        self.say(f"starting SeaweedFS S3 on {self.s3.endpoint} ...")
        took = self.s3.start()
        self.say(f"  S3 ready in {took:.1f}s")
        self._record(self.s3.process)
        return self.s3.endpoint

    def _start_services(self, settings: Settings) -> None:
        """The API (gunicorn) and the supervised CPU workers; returns once the API answers."""
        config = self.config
        env = {**config.base_env, **service_env(settings), "PYTHONUNBUFFERED": "1"}
        self.say(
            f"starting the API (gunicorn) on {self.api_url} and {config.workers} worker(s) ..."
        )
        api = self._spawn(
            "api", api_command(f"127.0.0.1:{config.api_port}", config=API_CONFIG), env
        )
        launcher = [sys.executable, "-m", "worker.launcher", "--cpu"]
        self.workers = self._spawn("worker", [*launcher, "--replicas", str(config.workers)], env)
        wait_for_api(self.api_url, api, timeout_s=config.ready_timeout_s)

    def wait_for_workers(self, timeout_s: float) -> None:
        """Wait until /readyz says a worker answers (the model takes a while to load)."""
        wait_for_api(
            self.api_url, self.workers, timeout_s=timeout_s, path="/readyz", interval_s=0.5
        )

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> ManagedProcess:
        process = ManagedProcess(
            name,
            argv,
            env=env,
            log_path=self.run_dir / "logs" / f"{name}.log",
            cwd=PROJECT_ROOT,
            detach=self.detach,
        )
        process.start()
        self._record(process)
        return process

    def _record(self, process: ManagedProcess) -> None:
        self.processes.append(process)
        path = self.run_dir / "pids" / f"{process.name}.json"
        path.write_text(json.dumps(process.pid_record(), indent=2) + "\n")

    def stop(self) -> None:
        """Stop what this object started, newest first, and clear its pid files."""
        for process in reversed(self.processes):
            process.stop()
            (self.run_dir / "pids" / f"{process.name}.json").unlink(missing_ok=True)
        self.processes.clear()
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)


def service_env(settings: Settings, **also: object) -> dict[str, str]:
    """The FEATUREMAPS_* variables that point an API or worker process at these services,
    plus ``FEATUREMAPS_<NAME>`` for each further setting in ``also`` (``batch_chunk=16``).

    The one place such an environment is built: the local stack, the benchmarks and the
    integration and fault tests all start their processes with it."""
    return {
        "FEATUREMAPS_REDIS_URL": settings.redis_url,
        "FEATUREMAPS_S3_ENDPOINT": settings.s3_endpoint,
        "FEATUREMAPS_S3_ACCESS_KEY": settings.s3_access_key,
        "FEATUREMAPS_S3_SECRET_KEY": settings.s3_secret_key,
        "FEATUREMAPS_S3_BUCKET": settings.s3_bucket,
        "FEATUREMAPS_S3_REGION": settings.s3_region,
        "FEATUREMAPS_S3_PUBLIC_ENDPOINT": settings.s3_public_endpoint,
        "FEATUREMAPS_WEIGHTS": settings.weights,
        **{f"FEATUREMAPS_{name.upper()}": str(value) for name, value in also.items()},
    }


def _pid_records(run_dir: Path) -> dict[str, dict]:
    records = {}
    for path in sorted((run_dir / "pids").glob("*.json")):
        records[path.stem] = json.loads(path.read_text())
    return records


def read_state(run_dir: Path) -> dict | None:
    path = Path(run_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def is_up(run_dir: Path) -> bool:
    """Whether any process recorded in ``run_dir`` is still running."""
    return any(record_is_alive(r) for r in _pid_records(Path(run_dir)).values())


def status(run_dir: Path) -> dict:
    """What ``run_dir`` says is running, whether each process is alive, and API health."""
    run_dir = Path(run_dir).resolve()
    state = read_state(run_dir) or {}
    processes = {
        name: {"pid": record["pid"], "running": record_is_alive(record), "log": record.get("log")}
        for name, record in _pid_records(run_dir).items()
    }
    api_url = state.get("api_url")
    return {
        "run_dir": str(run_dir),
        "state": state,
        "processes": processes,
        "healthy": bool(api_url) and answers(f"{api_url}/healthz"),
        "ready": bool(api_url) and answers(f"{api_url}/readyz"),
    }


def stop_run_dir(run_dir: Path, grace_s: float = 15.0) -> list[str]:
    """Stop the processes ``run_dir``'s pid files name, in reverse start order; returns the
    names of those that were still running. Pid reuse is guarded by the recorded start time."""
    run_dir = Path(run_dir).resolve()
    records = _pid_records(run_dir)
    order = (read_state(run_dir) or {}).get("order") or ["redis", "s3", "api", "worker"]
    names = [n for n in order if n in records] + [n for n in records if n not in order]
    stopped = []
    for name in reversed(names):
        if stop_recorded(records[name], grace_s=grace_s):
            stopped.append(name)
        (run_dir / "pids" / f"{name}.json").unlink(missing_ok=True)
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped
