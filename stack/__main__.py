"""`python -m stack` / `featuremaps-stack`: run the whole service locally, without Docker.

    python -m stack up        start redis, S3, API and a worker in the background
    python -m stack status    what is running, and whether the API is healthy and ready
    python -m stack down      stop exactly what `up` started
    python -m stack demo      up (if needed), submit a sample photo, download its figure

Configuration (environment, read only here):
    FEATUREMAPS_STACK_RUN_DIR     run directory: pids, logs, data (default ./run)
    FEATUREMAPS_API_PORT          API port (default 8000)
    FEATUREMAPS_STACK_REDIS_PORT  Redis port (default: a free one; never the system's 6379)
    FEATUREMAPS_STACK_S3_PORT     SeaweedFS S3 port (default: a free one)
    FEATUREMAPS_STACK_WORKERS     CPU worker processes (default 1)
    FEATUREMAPS_WEIGHTS           imagenet | random | state_dict path (default: imagenet if
                                  cached under TORCH_HOME, else random, and it says so)
    FEATUREMAPS_S3_ENDPOINT       use this S3 server instead of starting SeaweedFS, with
    FEATUREMAPS_S3_ACCESS_KEY / _SECRET_KEY / _BUCKET / _REGION / _PUBLIC_ENDPOINT
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from stack.local import LocalStack, StackConfig, is_up, resolve_weights, status, stop_run_dir
from stack.services import ServiceError

DEFAULT_RUN_DIR = "run"
DEMO_OUTPUT = Path("out/demo")


def config_from_env(
    environ: Mapping[str, str], *, fetch: bool = False
) -> tuple[StackConfig, str | None]:
    """The stack's configuration from the environment, and the weights notice (if any);
    ``fetch`` downloads missing ImageNet checkpoints first (``up`` and ``demo``)."""

    def port(name: str, default: int | None) -> int | None:
        value = environ.get(name, "").strip()
        if not value:
            return default
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise SystemExit(f"{name} must be a TCP port number, not {value!r}")
        return int(value)

    weights, notice = resolve_weights(environ, fetch=fetch)
    workers = environ.get("FEATUREMAPS_STACK_WORKERS", "1").strip() or "1"
    if not workers.isdigit() or int(workers) < 1:
        raise SystemExit(f"FEATUREMAPS_STACK_WORKERS must be a positive integer, not {workers!r}")
    config = StackConfig(
        run_dir=Path(environ.get("FEATUREMAPS_STACK_RUN_DIR") or DEFAULT_RUN_DIR),
        weights=weights,
        api_port=port("FEATUREMAPS_API_PORT", 8000) or 8000,
        redis_port=port("FEATUREMAPS_STACK_REDIS_PORT", None),
        s3_port=port("FEATUREMAPS_STACK_S3_PORT", None),
        workers=int(workers),
        external_s3_endpoint=environ.get("FEATUREMAPS_S3_ENDPOINT") or None,
        s3_public_endpoint=environ.get("FEATUREMAPS_S3_PUBLIC_ENDPOINT") or None,
        base_env=dict(environ),
    )
    for field_name, variable in (
        ("s3_access_key", "FEATUREMAPS_S3_ACCESS_KEY"),
        ("s3_secret_key", "FEATUREMAPS_S3_SECRET_KEY"),
        ("s3_bucket", "FEATUREMAPS_S3_BUCKET"),
        ("s3_region", "FEATUREMAPS_S3_REGION"),
    ):
        if environ.get(variable):
            setattr(config, field_name, environ[variable])
    return config, notice


def say(message: str) -> None:
    print(message, flush=True)


def cmd_up(config: StackConfig, notice: str | None, *, wait_workers_s: float) -> int:
    if is_up(config.run_dir):
        say(f"already running from {Path(config.run_dir).resolve()}:")
        return cmd_status(config)
    say(f"weights: {config.weights}")
    if notice:
        say(notice)
    stack = LocalStack(config, detach=True, say=say)
    try:
        state = stack.start()
    except ServiceError as exc:
        print(f"featuremaps-stack: could not start: {exc}", file=sys.stderr)
        return 1
    say(f"API:      {state['api_url']}   (health: {state['api_url']}/healthz)")
    say(f"S3:       http://{state['s3_endpoint']}   bucket {state['s3_bucket']}")
    say(f"Redis:    {state['redis_url']}")
    say(f"run dir:  {state['run_dir']}   (logs in {state['run_dir']}/logs, pids in pids/)")
    say(f"weights:  {state['weights']}   workers: {state['workers']}")
    if wait_workers_s > 0:
        say(f"waiting up to {wait_workers_s:.0f}s for a worker to load the model ...")
        try:
            stack.wait_for_workers(wait_workers_s)
        except ServiceError as exc:
            print(f"featuremaps-stack: no worker is ready: {exc}", file=sys.stderr)
            print("the stack is still up; `python -m stack down` stops it", file=sys.stderr)
            return 1
        say("ready: a worker answers")
    say("stop it with `python -m stack down` (or `make down`)")
    return 0


def cmd_down(config: StackConfig) -> int:
    stopped = stop_run_dir(config.run_dir)
    if stopped:
        say(f"stopped {', '.join(stopped)} (run dir {Path(config.run_dir).resolve()})")
    else:
        say(f"nothing was running from {Path(config.run_dir).resolve()}")
    return 0


def cmd_status(config: StackConfig) -> int:
    report = status(config.run_dir)
    if not report["processes"]:
        say(f"not running (no pid files in {report['run_dir']}/pids)")
        return 1
    state = report["state"]
    for name, info in report["processes"].items():
        say(f"{name:<7} pid {info['pid']:<8} {'running' if info['running'] else 'NOT RUNNING'}")
    if state:
        say(f"API {state['api_url']}  S3 http://{state['s3_endpoint']}  weights {state['weights']}")
    say(f"healthy: {report['healthy']}  ready: {report['ready']}")
    return 0 if all(p["running"] for p in report["processes"].values()) else 1


def sample_photo(run_dir: Path) -> Path:
    """matplotlib's Grace Hopper photo; in a slim install without it, a generated image."""
    try:
        import matplotlib

        photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if photo.is_file():
            return photo
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 240), (30, 30, 60))
    draw = ImageDraw.Draw(image)
    for i in range(0, 320, 20):
        draw.line([(i, 0), (320 - i, 240)], fill=(200, i % 256, 90), width=3)
    draw.ellipse([100, 60, 220, 180], outline=(250, 250, 250), width=6)
    path = Path(run_dir) / "demo_input.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return path


def cmd_demo(config: StackConfig, notice: str | None) -> int:
    if not is_up(config.run_dir):
        code = cmd_up(config, notice, wait_workers_s=300)
        if code:
            return code
    api_url = (status(config.run_dir)["state"] or {}).get("api_url") or (
        f"http://127.0.0.1:{config.api_port}"
    )
    photo = sample_photo(config.run_dir)
    say(f"submitting {photo} to {api_url} ...")
    from client.cli import main as client_main

    # The client prints the finished job's document (long presigned URLs included): kept in
    # a file, and what a newcomer wants said instead (the job's page, the figure's path).
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = client_main(
            ["submit", str(photo), "--wait", "--download", str(DEMO_OUTPUT), "--api", api_url]
        )
    figures = sorted(DEMO_OUTPUT.glob("feature_maps.*"))
    if code or not figures:
        print(printed.getvalue(), end="")
        print("featuremaps-stack: the demo job did not succeed (see above)", file=sys.stderr)
        return code or 1
    text = printed.getvalue()
    job = json.loads(text[text.index("{") : text.rindex("}") + 1])
    document = DEMO_OUTPUT / "job.json"
    document.write_text(json.dumps(job, indent=2) + "\n")
    job_id = job.get("id", "")
    say(f"job page: {api_url}/ui/jobs/{job_id}")
    say(f"figure:   {figures[0].resolve()}")
    say(f"job:      {document.resolve()} (the job's document)")
    manifest = DEMO_OUTPUT / "manifest.json"
    if manifest.is_file():
        layers = json.loads(manifest.read_text()).get("layers") or []
        say(f"manifest: {manifest.resolve()} ({len(layers)} layers)")
    say("the stack is still running; `python -m stack down` stops it")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="featuremaps-stack",
        description="Run featuremaps locally (redis-server, SeaweedFS, API, worker), no Docker.",
        epilog="Configuration" + __doc__.split("Configuration", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start everything in the background")
    up.add_argument(
        "--wait-workers",
        type=float,
        default=180.0,
        metavar="S",
        help="also wait up to S seconds until a worker is ready (0: don't)",
    )
    sub.add_parser("down", help="stop exactly what `up` started")
    sub.add_parser("status", help="show what is running")
    sub.add_parser("demo", help="up, then submit a sample photo and download its figure")
    args = parser.parse_args(argv)

    config, notice = config_from_env(os.environ, fetch=args.command in ("up", "demo"))
    if args.command == "up":
        return cmd_up(config, notice, wait_workers_s=args.wait_workers)
    if args.command == "down":
        return cmd_down(config)
    if args.command == "status":
        return cmd_status(config)
    return cmd_demo(config, notice)


if __name__ == "__main__":
    sys.exit(main())
