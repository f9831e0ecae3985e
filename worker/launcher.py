"""`featuremaps-worker`: one Celery worker process per GPU, each pinned with
CUDA_VISIBLE_DEVICES, concurrency 1, and a hostname that names its GPU.

    featuremaps-worker --gpus 0,1      # two workers: gpu0@host, gpu1@host
    featuremaps-worker --cpu           # one CPU worker: cpu@host  (same as --gpus none)
    featuremaps-worker --cpu --replicas 2

The weights are checked before any worker starts, so a missing ImageNet checkpoint is one
clear message at start, not a crash loop. A worker that exits is restarted with exponential
backoff and given up on if it crash-loops, while the others keep serving
(:mod:`worker.supervisor`); the launcher exits non-zero once every worker was given up on.
SIGTERM/SIGINT are forwarded to every worker (Celery's warm shutdown: running jobs finish)
and the launcher exits when all are down.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys

from shared.errors import WeightsUnavailable
from shared.queue import WORKER_QUEUES
from shared.settings import Settings
from stack.commands import cpu_worker_env, gpu_worker_env, worker_command
from worker.supervisor import RestartPolicy, Supervisor, WorkerProcess, WorkerSpec


def parse_gpus(value: str) -> list[str]:
    if value in ("none", "cpu", ""):
        return []
    if value == "auto":
        return detect_gpus()
    gpus = [g.strip() for g in value.split(",") if g.strip()]
    if not all(g.isdigit() for g in gpus):
        raise argparse.ArgumentTypeError(f"--gpus takes indices like 0,1 or 'none', not {value!r}")
    return gpus


def detect_gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    # A fixed argv, no shell; nvidia-smi's place depends on the driver install, so it is
    # looked up on PATH (bandit B607).
    out = subprocess.run(  # nosec B603, B607
        ["nvidia-smi", "-L"], capture_output=True, text=True, check=False
    )
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def worker_commands(
    gpus: list[str], *, replicas: int, loglevel: str, queues: str, metrics_port: int = 0
) -> list[WorkerSpec]:
    """(hostname, argv, extra env) for each worker process to start; with a metrics port,
    the N-th worker serves its metrics on ``metrics_port + N``."""
    specs = _worker_specs(gpus, replicas=replicas, loglevel=loglevel, queues=queues)
    if not metrics_port:
        return specs
    return [
        spec._replace(env={**spec.env, "FEATUREMAPS_WORKER_METRICS_PORT": str(metrics_port + n)})
        for n, spec in enumerate(specs)
    ]


def _worker_specs(
    gpus: list[str], *, replicas: int, loglevel: str, queues: str
) -> list[WorkerSpec]:
    def spec(hostname: str, env: dict[str, str]) -> WorkerSpec:
        return WorkerSpec(hostname, worker_command(hostname, queues=queues, loglevel=loglevel), env)

    if gpus:
        return [spec(f"gpu{g}@%h", gpu_worker_env(g)) for g in gpus]
    names = ["cpu"] if replicas == 1 else [f"cpu{i}" for i in range(replicas)]
    return [spec(f"{n}@%h", cpu_worker_env(len(names))) for n in names]


# (flag, RestartPolicy field, type, help); defaults come from RestartPolicy itself.
RESTART_FLAGS = (
    ("--restart-backoff", "backoff_s", float, "first delay before a restart; doubles after each"),
    ("--restart-backoff-max", "max_backoff_s", float, "longest delay before a restart"),
    (
        "--restart-reset-after",
        "reset_after_s",
        float,
        "a worker up this long restarts after the first delay again",
    ),
    ("--max-restarts", "max_restarts", int, "give a worker up after N restarts in the window"),
    ("--restart-window", "window_s", float, "the window --max-restarts counts in"),
)


def _add_restart_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("restarting workers that exit")
    defaults = RestartPolicy()
    for flag, field, kind, text in RESTART_FLAGS:
        group.add_argument(
            flag,
            dest=field,
            type=kind,
            default=getattr(defaults, field),
            metavar="N" if kind is int else "S",
            help=f"{text} (default %(default)s)",
        )


def check_weights(settings: Settings) -> None:
    """The workers' weights can be had: ResNet-18's load, and with ``imagenet`` every other
    enabled architecture's checkpoint is in torchvision's cache (downloaded now if not), so
    a worker refuses to start rather than fail jobs later (docs/design.md "Models")."""
    from worker.compute.model import check_imagenet_checkpoint, load_model

    load_model(settings.weights, device="cpu", seed=settings.weights_seed)
    if settings.weights == "imagenet":
        for architecture in settings.enabled_models[1:]:
            check_imagenet_checkpoint(architecture)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="featuremaps-worker", description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default="auto", help="GPU indices (0,1), 'none', or 'auto'")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (same as --gpus none)")
    parser.add_argument("--replicas", type=int, default=1, help="CPU workers to start")
    parser.add_argument(
        "--queues", default=WORKER_QUEUES, help="queues to consume, in priority order"
    )
    parser.add_argument("--loglevel", default="INFO")
    _add_restart_flags(parser)
    args = parser.parse_args(argv)
    gpus = [] if args.cpu else parse_gpus(args.gpus)
    try:
        policy = RestartPolicy(**{field: getattr(args, field) for _, field, _, _ in RESTART_FLAGS})
    except ValueError as exc:
        parser.error(str(exc))
    settings = Settings()
    try:
        check_weights(settings)
    except WeightsUnavailable as exc:
        print(f"featuremaps-worker: {exc.message}", file=sys.stderr)
        return 2
    specs = worker_commands(
        gpus,
        replicas=args.replicas,
        loglevel=args.loglevel,
        queues=args.queues,
        metrics_port=settings.worker_metrics_port,
    )
    supervisor = Supervisor(
        specs, spawn=lambda spec: WorkerProcess(spec, os.environ), policy=policy
    )
    signal.signal(signal.SIGTERM, lambda signum, _frame: supervisor.shutdown(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: supervisor.shutdown(signum))
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
