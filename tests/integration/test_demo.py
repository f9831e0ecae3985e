"""`make demo` end to end: `python -m stack demo` brings the local stack up, sends the sample
photo through the API, a worker and S3, and leaves the figure where it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from stack.services import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_demo_renders_the_sample_photo_through_the_stack(tmp_path, redis_server, s3_server):
    # redis_server and s3_server: the same executables the demo starts must be installed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREMAPS_")}
    env.update(
        FEATUREMAPS_STACK_RUN_DIR=str(tmp_path / "run"),
        FEATUREMAPS_API_PORT=str(free_port()),
        TORCH_HOME=str(tmp_path / "torch"),  # no ImageNet checkpoint here: random, said so
        # ... after trying to fetch it from a port where nothing listens (offline)
        FEATUREMAPS_WEIGHTS_BASE_URL=f"http://127.0.0.1:{free_port()}/models/",
        PYTHONPATH=str(ROOT),
    )

    def stack(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stack", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    try:
        demo = stack("demo")
    finally:
        down = stack("down")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert down.returncode == 0, down.stdout + down.stderr
    assert "using seeded random weights" in demo.stdout + demo.stderr
    figure = tmp_path / "out" / "demo" / "feature_maps.jpg"
    assert f"figure:   {figure}" in demo.stdout
    with Image.open(figure) as image:
        assert image.format == "JPEG"
    manifest = json.loads((tmp_path / "out" / "demo" / "manifest.json").read_text())
    assert len(manifest["layers"]) == 17 and manifest["weights"]["name"] == "random"
    # The demo ends with the job's page and the figure's path; the job's document, with its
    # long presigned URLs, is in a file beside the figure.
    document = json.loads((tmp_path / "out" / "demo" / "job.json").read_text())
    assert document["status"] == "succeeded" and document["worker"]
    assert f"/ui/jobs/{document['id']}" in demo.stdout.split("job page: ", 1)[1].split()[0]
    assert "X-Amz-" not in demo.stdout
