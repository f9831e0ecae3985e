"""docker-compose.yml validates with Debian's docker-compose (no engine needed), keeps the
deployment properties the operators rely on, and has no default secrets and nothing published
beyond loopback by default (docs/security.md)."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_executable

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "REDIS_PASSWORD": "redis-pw-sentinel",
    "MINIO_ROOT_USER": "root-user-sentinel",
    "MINIO_ROOT_PASSWORD": "root-pw-sentinel",
    "FEATUREMAPS_S3_ACCESS_KEY": "service-user-sentinel",
    "FEATUREMAPS_S3_SECRET_KEY": "service-secret-sentinel",
}


def _compose(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    compose = require_executable("docker-compose", "apt-get install docker-compose")
    env_file = tmp_path / "empty.env"  # never a developer's own .env
    env_file.write_text("")
    return subprocess.run(
        [compose, "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", **env},
        cwd=ROOT,
    )


@pytest.fixture
def secrets_env(tmp_path) -> dict[str, str]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ops:{'0' * 64}\n")
    return {**SECRETS, "FEATUREMAPS_API_TOKENS_FILE": str(tokens)}


def _rendered(tmp_path: Path, **env: str) -> dict:
    result = _compose(tmp_path, "config", **env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_validates(tmp_path, secrets_env):
    result = _compose(tmp_path, "config", "-q", **secrets_env)
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_secrets_and_says_which(tmp_path, secrets_env):
    result = _compose(tmp_path, "config", "-q")
    assert result.returncode != 0
    assert "set REDIS_PASSWORD" in result.stderr
    for name in secrets_env:
        missing = {k: v for k, v in secrets_env.items() if k != name}
        result = _compose(tmp_path, "config", "-q", **missing)
        assert result.returncode != 0, name
        assert f"set {name}" in result.stderr, (name, result.stderr)


def test_no_secret_literal_in_the_compose_file():
    text = (ROOT / "docker-compose.yml").read_text()
    config = yaml.safe_load(text)
    envs = [s.get("environment", {}) for s in config["services"].values()]
    envs += [v for k, v in config.items() if k.startswith("x-")]
    checked = 0
    for env in envs:
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|_KEY$|TOKEN|REDIS_URL", key):
                assert str(value).startswith(("${", "/run/secrets/")) or ":${" in value, key
                checked += 1
    assert checked >= 8
    assert "minioadmin" not in text and "featuremaps-secret" not in text


def test_secrets_reach_only_who_needs_them(tmp_path, secrets_env):
    services = _rendered(tmp_path, **secrets_env)["services"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["FEATUREMAPS_S3_ACCESS_KEY"] == SECRETS["FEATUREMAPS_S3_ACCESS_KEY"]
        assert env["FEATUREMAPS_S3_SECRET_KEY"] == SECRETS["FEATUREMAPS_S3_SECRET_KEY"]
        assert env["FEATUREMAPS_REDIS_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
        assert not [v for v in env.values() if "root-" in str(v)], name
    assert services["api"]["environment"]["FEATUREMAPS_API_TOKENS_FILE"].startswith("/run/")
    assert services["minio-init"]["environment"]["MINIO_ROOT_USER"] == SECRETS["MINIO_ROOT_USER"]


def test_nothing_published_beyond_loopback_by_default(tmp_path, secrets_env):
    services = _rendered(tmp_path, **secrets_env)["services"]
    published = {name: s.get("ports", []) for name, s in services.items()}
    assert published["redis"] == [] and published["worker"] == []
    assert published["api"] == ["127.0.0.1:8000:8000/tcp"]
    assert published["minio"] == ["127.0.0.1:9000:9000/tcp"]  # the console (9001) is not
    for ports in published.values():
        assert all(str(port).startswith("127.0.0.1:") for port in ports), ports
    operator = _rendered(tmp_path, **secrets_env, FEATUREMAPS_BIND_ADDRESS="10.0.0.5")
    assert operator["services"]["api"]["ports"] == ["10.0.0.5:8000:8000/tcp"]


def test_redis_requires_a_password(tmp_path, secrets_env):
    redis = _rendered(tmp_path, **secrets_env)["services"]["redis"]
    assert "--requirepass" in " ".join(redis["command"])
    assert redis["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]


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


def _policy(**env: str) -> dict:
    result = subprocess.run(
        ["sh", str(ROOT / "docker" / "minio-init.sh"), "policy"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    return json.loads(result.stdout)


def test_service_policy_is_limited_to_its_bucket_and_read_only_sources():
    policy = _policy(
        FEATUREMAPS_S3_BUCKET="featuremaps",
        FEATUREMAPS_SOURCE_ALLOW="s3://photos/incoming/, alice=s3://team-data/alice/",
    )
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    assert all(s["Effect"] == "Allow" for s in by_sid.values())
    for statement in by_sid.values():
        assert not any("*" in action for action in statement["Action"])
        assert all(r.startswith("arn:aws:s3:::") for r in statement["Resource"])
        assert "arn:aws:s3:::*" not in statement["Resource"]
    assert by_sid["ServiceBucket"]["Resource"] == ["arn:aws:s3:::featuremaps"]
    assert by_sid["ServiceObjects"]["Resource"] == ["arn:aws:s3:::featuremaps/*"]
    assert by_sid["SourceRead1"] == {
        "Sid": "SourceRead1",
        "Effect": "Allow",
        "Action": ["s3:GetObject"],
        "Resource": ["arn:aws:s3:::photos/incoming/*"],
    }
    assert by_sid["SourceList2"]["Resource"] == ["arn:aws:s3:::team-data"]
    assert by_sid["SourceList2"]["Condition"] == {"StringLike": {"s3:prefix": ["alice/*"]}}
    sources = [s for sid, s in by_sid.items() if sid.startswith("Source")]
    assert {a for s in sources for a in s["Action"]} == {"s3:ListBucket", "s3:GetObject"}


def test_documented_aws_policy_is_the_one_minio_init_writes():
    documented = json.loads((ROOT / "docs" / "aws-iam-policy.json").read_text())
    assert documented == _policy(
        FEATUREMAPS_S3_BUCKET="featuremaps", FEATUREMAPS_SOURCE_ALLOW="s3://photos/incoming/"
    )
