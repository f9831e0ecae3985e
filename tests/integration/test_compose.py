"""docker-compose.yml validates with Debian's docker-compose (no engine needed) and keeps
the deployment properties the operators rely on."""

import subprocess
from pathlib import Path

import yaml

from tests.conftest import require_executable

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_validates():
    compose = require_executable("docker-compose", "apt-get install docker-compose")
    result = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_compose_services_are_configured_for_durability_and_gpus():
    config = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = config["services"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    assert {"redis", "minio", "minio-init", "api", "worker"} <= set(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--gpus" in services["worker"]["command"]
    for name in ("redis", "minio", "api", "worker"):
        assert "healthcheck" in services[name], name
