"""Service latency benchmark: submit → ``succeeded`` through the real local stack (gunicorn
API, redis-server, SeaweedFS, one warm CPU worker), one job at a time, beside the in-process
time of the same image in the same run.

Reported per job (p50 and p95 over at least 50 jobs, after warm-up):

- ``client_ms``: POST /jobs until the client sees ``succeeded`` (polling every 5 ms);
- ``server_ms``: the job's own ``finished_at - created_at``;
- ``compute_ms``: the worker's decode + model + reduce + render + encode for that job;
- ``overhead_ms``: ``server_ms - compute_ms`` — queue, input download, output upload and
  job-record writes: what the service adds to the computation;
- ``in_process_ms``: :func:`worker.compute.pipeline.process_image` on the same bytes in
  this process.

Target: overhead p50 ≤ 50 ms on the 2-core development machine.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import matplotlib
import requests

from client.api import Client
from shared.options import JobOptions
from stack.local import LocalStack, StackConfig
from stack.services import free_port
from worker.compute.model import load_model
from worker.compute.pipeline import process_image

COMPUTE_STAGES = ("decode_ms", "model_ms", "reduce_ms", "render_ms", "encode_ms")
IMAGE = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
JOBS = 50
WARMUP = 5


def run(repeat: int) -> dict:
    data = IMAGE.read_bytes()
    with tempfile.TemporaryDirectory(prefix="featuremaps-bench-") as run_dir:
        # Every job sends the same image: each must compute, not reuse the first's result.
        config = StackConfig(
            run_dir=Path(run_dir),
            api_port=free_port(),
            base_env={"FEATUREMAPS_REUSE_RESULTS": "false"},
        )
        stack = LocalStack(config)
        try:
            stack.start()
            stack.wait_for_workers(timeout_s=120)
            jobs = _run_jobs(stack.api_url, data, count=WARMUP + JOBS * max(1, repeat // 3))
        finally:
            stack.stop()
    jobs = jobs[WARMUP:]
    loaded = load_model("random", device="cpu", seed=0)
    process_image(loaded, data, JobOptions(), max_pixels=50_000_000)
    in_process = []
    for _ in range(20):
        started = time.perf_counter()
        process_image(loaded, data, JobOptions(), max_pixels=50_000_000)
        in_process.append((time.perf_counter() - started) * 1000)
    numbers = {
        "jobs": len(jobs),
        "client_ms": _percentiles([j["client_ms"] for j in jobs]),
        "server_ms": _percentiles([j["server_ms"] for j in jobs]),
        "compute_ms": _percentiles([j["compute_ms"] for j in jobs]),
        "overhead_ms": _percentiles([j["server_ms"] - j["compute_ms"] for j in jobs]),
        "queue_ms": _percentiles([j["timings"]["queue_ms"] for j in jobs]),
        "download_ms": _percentiles([j["timings"].get("download_ms", 0.0) for j in jobs]),
        "upload_ms": _percentiles([j["timings"]["upload_ms"] for j in jobs]),
        "in_process_ms": _percentiles(in_process),
    }
    numbers["client_minus_in_process_p50_ms"] = round(
        numbers["client_ms"]["p50"] - numbers["in_process_ms"]["p50"], 1
    )
    _print(numbers)
    return numbers


def _run_jobs(api: str, data: bytes, *, count: int) -> list[dict]:
    session = requests.Session()
    client = Client(api, session=session)
    jobs = []
    for _ in range(count):
        started = time.perf_counter()
        response = session.post(f"{api}/jobs", files={"image": ("grace_hopper.jpg", data)})
        response.raise_for_status()
        job_id = response.json()["id"]
        doc = client.job(job_id).wait(interval=0.005).doc
        client_ms = (time.perf_counter() - started) * 1000
        if doc["status"] != "succeeded":
            raise RuntimeError(f"benchmark job {job_id} ended {doc['status']}: {doc['error']}")
        jobs.append(
            {
                "client_ms": client_ms,
                "server_ms": (_ts(doc["finished_at"]) - _ts(doc["created_at"])) * 1000,
                "compute_ms": sum(doc["timings"][s] for s in COMPUTE_STAGES),
                "timings": doc["timings"],
            }
        )
    return jobs


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 1), "p95": round(p95, 1)}


def _print(numbers: dict) -> None:
    print(f"\nService latency, {numbers['jobs']} jobs one at a time, warm CPU worker (ms)")
    print(f"{'':28}{'p50':>10}{'p95':>10}")
    for key in (
        "client_ms",
        "server_ms",
        "compute_ms",
        "overhead_ms",
        "queue_ms",
        "download_ms",
        "upload_ms",
        "in_process_ms",
    ):
        row = numbers[key]
        print(f"{key:28}{row['p50']:>10.1f}{row['p95']:>10.1f}")
    print(
        f"overhead p50 {numbers['overhead_ms']['p50']:.1f} ms (target ≤ 50 ms); client p50 − "
        f"in-process p50 = {numbers['client_minus_in_process_p50_ms']:.1f} ms"
    )
