"""The Kubernetes manifests in deploy/k8s/, checked offline.

Schemas: built-in kinds are validated by kubernetes-validate in strict mode (it ships the
Kubernetes OpenAPI schemas; an unknown field is an error). The KEDA ScaledObject and the
Prometheus operator's PodMonitor and PrometheusRule are validated with jsonschema against the
openAPIV3Schema of their official CRDs, vendored unchanged in deploy/crds/ (KEDA v2.20.2,
prometheus-operator v0.93.0; deploy/crds/README.md). CRD schemas leave additionalProperties
open (the API server prunes unknown fields, and `kubectl apply --validate=strict` rejects
them); the test closes every object schema that lists its properties, so a misspelt field
fails here as it would under strict validation.

Then what matters for running it: GPU limits, a grace period above the task time limits
read from shared/settings.py, probes on endpoints the API really serves, and KEDA reading
the backlog from a route the API serves, on its Service.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.queue import QUEUES, WORKER_QUEUES, broker_options, queue_keys
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CRDS = ROOT / "deploy" / "crds"
KUBERNETES_VERSION = "1.33.0"
# Every way to apply it: GPU workers, CPU workers, and the monitoring add-on.
KUSTOMIZATIONS = (K8S, K8S / "cpu", K8S / "monitoring")


def kustomization_files(directory: Path) -> Iterator[Path]:
    """The manifest files a kustomization uses, following nested kustomizations."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            yield from kustomization_files(path)
        else:
            yield path


def documents(directory: Path) -> list[dict]:
    docs = []
    for path in kustomization_files(directory):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def all_manifests() -> dict[str, dict]:
    """Every object of every kustomization, by kind/name, each file read once."""
    files = {p for d in KUSTOMIZATIONS for p in kustomization_files(d)}
    found = {}
    for path in sorted(files):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[f"{path.relative_to(K8S)}:{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the CRD's openAPIV3Schema, closed against unknown fields."""
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = closed(version["schema"]["openAPIV3Schema"])
            schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def closed(schema: dict) -> dict:
    """The schema with ``additionalProperties: false`` on every object that lists its
    properties and does not keep unknown fields on purpose."""
    schema = copy.deepcopy(schema)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


CRD_SCHEMAS = crd_schemas()


def validate(doc: dict) -> None:
    """Raise when the object does not match its kind's schema."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.Draft7Validator(CRD_SCHEMAS[key]).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.fixture
def defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FEATUREMAPS_* of the developer's own leak into the Settings read here."""
    for name in list(__import__("os").environ):
        if name.startswith("FEATUREMAPS_"):
            monkeypatch.delenv(name)


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(c: dict) -> dict[str, str]:
    """The container's literal env values (not those from Secrets)."""
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def deployed_settings(docs: list[dict]) -> Settings:
    """The settings the workers run with: the defaults, the ConfigMap's values, then their
    own env (the Redis URL with its password still a $(REDIS_PASSWORD) reference)."""
    values = dict(find(docs, "ConfigMap", "featuremaps-config")["data"])
    values.update(env_of(container(find(docs, "Deployment", "worker"))))
    return Settings(
        **{
            key.removeprefix("FEATUREMAPS_").lower(): value
            for key, value in values.items()
            if key.startswith("FEATUREMAPS_")
        }
    )


# -- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(all_manifests()))
def test_every_manifest_matches_its_schema(name: str) -> None:
    validate(all_manifests()[name])


def test_the_crd_kinds_used_have_vendored_schemas() -> None:
    builtin_groups = ("v1", "apps/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1")
    for doc in all_manifests().values():
        if doc["apiVersion"] not in builtin_groups:
            assert (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS


@pytest.mark.parametrize(
    ("kind", "name", "misspell"),
    [
        ("Deployment", "worker", ("spec", "template", "spec", "terminationGracePeriodSecond")),
        ("Deployment", "api", ("spec", "template", "spec", "containers", 0, "readinesProbe")),
        ("ScaledObject", "worker", ("spec", "maxReplicaCont")),
        ("ScaledObject", "worker", ("spec", "advanced", "scalingModifier")),
        ("StatefulSet", "redis", ("spec", "volumeClaimTemplate")),
    ],
)
def test_a_misspelt_field_fails_validation(kind: str, name: str, misspell: tuple) -> None:
    doc = copy.deepcopy(find(documents(K8S), kind, name))
    validate(doc)
    node = doc
    for step in misspell[:-1]:
        node = node[step]
    node[misspell[-1]] = 1
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc)


def test_a_misspelt_field_in_an_alert_rule_fails_validation() -> None:
    doc = copy.deepcopy(find(documents(K8S / "monitoring"), "PrometheusRule", "featuremaps"))
    doc["spec"]["groups"][0]["rules"][0]["expresion"] = "up"
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


# -- what matters --------------------------------------------------------------------------


def test_gpu_workers_take_one_gpu_each_and_run_one_worker_process_on_it() -> None:
    worker = container(find(documents(K8S), "Deployment", "worker"))
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["command"] == ["featuremaps-worker", "--gpus", "0"]
    cpu_worker = container(find(documents(K8S / "cpu"), "Deployment", "worker"))
    assert cpu_worker["command"] == ["featuremaps-worker", "--cpu"]
    assert "nvidia.com/gpu" not in json.dumps(cpu_worker["resources"])


@pytest.mark.usefixtures("defaults")
def test_gpu_workers_cut_batches_into_chunks_a_gpu_can_fill_and_cpu_workers_keep_the_default():
    # A GPU takes a whole chunk in one model pass; a CPU slices it (worker/batches/chunks.py).
    assert 64 <= deployed_settings(documents(K8S)).batch_chunk <= 256
    assert deployed_settings(documents(K8S / "cpu")).batch_chunk == Settings().batch_chunk


@pytest.mark.usefixtures("defaults")
@pytest.mark.parametrize("variant", [K8S, K8S / "cpu"])
def test_the_grace_period_outlasts_every_task_so_a_warm_shutdown_finishes_it(variant) -> None:
    docs = documents(variant)
    settings = deployed_settings(docs)
    longest = max(settings.task_time_limit_s, settings.expand_limits_s[1])
    pod = find(docs, "Deployment", "worker")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > longest
    # ... and no running task is handed to a second worker meanwhile.
    assert longest < settings.visibility_timeout_s


@pytest.mark.usefixtures("defaults")
def test_api_probes_point_at_endpoints_the_api_serves() -> None:
    from api import create_app

    unreachable = Settings(
        s3_endpoint="127.0.0.1:1",
        s3_access_key="test",
        s3_secret_key="test-secret",
        redis_url="redis://127.0.0.1:1/0",
    )
    app = create_app(unreachable)
    rules = {rule.rule for rule in app.url_map.iter_rules() if "GET" in rule.methods}
    api = container(find(documents(K8S), "Deployment", "api"))
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"] for p in api["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["path"] in rules
        assert api[probe]["httpGet"]["port"] in port_names
    monitor = find(documents(K8S / "monitoring"), "PodMonitor", "featuremaps")
    assert {"port": "http", "path": "/metrics"}.items() <= monitor["spec"]["podMetricsEndpoints"][
        0
    ].items()
    assert "/metrics" in rules


@pytest.mark.usefixtures("defaults")
@pytest.mark.parametrize("variant", [K8S, K8S / "cpu"])
def test_worker_probes_run_the_heartbeat_check_and_metrics_are_on_the_scraped_port(variant):
    docs = documents(variant)
    worker = container(find(docs, "Deployment", "worker"))
    for probe in ("startupProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"] == ["python", "-m", "worker.health"]
    from worker import health

    assert callable(health.main)
    (metrics_port,) = [p for p in worker["ports"] if p["name"] == "metrics"]
    assert int(env_of(worker)["FEATUREMAPS_WORKER_METRICS_PORT"]) == metrics_port["containerPort"]
    monitor = find(documents(K8S / "monitoring"), "PodMonitor", "featuremaps")
    assert "metrics" in {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    # The launcher's default queues are the ones that are scaled on.
    assert WORKER_QUEUES.split(",") == list(QUEUES)


@pytest.mark.usefixtures("defaults")
def test_keda_scales_on_the_backlog_the_api_serves_and_to_zero_when_it_is_empty() -> None:
    from api import create_app
    from worker.celery_app import app

    docs = documents(K8S)
    scaled = find(docs, "ScaledObject", "worker")["spec"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    assert (meta["format"], meta["valueLocation"]) == ("json", "for_workers")
    assert (meta["targetValue"], meta["activationTargetValue"]) == ("2", "0")
    assert scaled["scaleTargetRef"]["name"] == "worker"
    assert scaled["minReplicaCount"] == 0
    assert 0 < scaled["maxReplicaCount"] <= 64
    assert scaled["fallback"]["replicas"] == 1  # the API unreachable: work already queued moves
    # The API's Service, in the kustomization's namespace, on its port, at a route it serves.
    url = urlsplit(meta["url"])
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    service = find(docs, "Service", "api")
    assert url.hostname == f"api.{namespace}.svc.cluster.local"
    assert (url.port or 80) == service["spec"]["ports"][0]["port"]
    unreachable = Settings(
        s3_endpoint="127.0.0.1:1",
        s3_access_key="test",
        s3_secret_key="test-secret",
        redis_url="redis://127.0.0.1:1/0",
    )
    rules = {rule.rule for rule in create_app(unreachable).url_map.iter_rules()}
    assert url.path in rules
    # The backlog (keeper/backlog.py; tests/integration/test_reconciler.py) counts the lists
    # the Celery app files messages under, read with the API's broker options.
    options = app.conf.broker_transport_options
    assert [queue_keys(q, options) for q in QUEUES] == [
        queue_keys(q, broker_options(deployed_settings(docs))) for q in QUEUES
    ]


def test_only_the_api_and_the_workers_reach_redis() -> None:
    docs = documents(K8S)
    policy = find(docs, "NetworkPolicy", "redis")["spec"]
    redis = find(docs, "StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis.items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (same_namespace,) = rule["from"]
    (components,) = same_namespace["podSelector"]["matchExpressions"]
    assert components["values"] == ["api", "worker"]
    for name in components["values"]:
        labels = find(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == name


def test_redis_keeps_an_append_only_file_on_a_persistent_volume() -> None:
    redis = find(documents(K8S), "StatefulSet", "redis")["spec"]
    args = container({"spec": redis})["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    (claim,) = redis["volumeClaimTemplates"]
    mount = container({"spec": redis})["volumeMounts"][0]
    assert mount["name"] == claim["metadata"]["name"]
    assert mount["mountPath"] == args[args.index("--dir") + 1]


def test_every_referenced_config_and_secret_is_provided() -> None:
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    generated = {}
    for generator in base["secretGenerator"]:
        (env_file,) = generator["envs"]
        example = (K8S / "base" / f"{env_file}.example").read_text()
        keys = {line.split("=", 1)[0] for line in example.splitlines() if "=" in line}
        keys.discard("")
        generated[generator["name"]] = {k for k in keys if not k.startswith("#")}
    for variant in (K8S, K8S / "cpu"):
        docs = documents(variant)
        config_maps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
        for kind, name in (
            ("Deployment", "api"),
            ("Deployment", "worker"),
            ("StatefulSet", "redis"),
        ):
            c = container(find(docs, kind, name))
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps
                else:
                    assert source["secretRef"]["name"] in generated
            for variable in c.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in generated[ref["name"]]
    # Tokens go to the API only.
    worker = container(find(documents(K8S), "Deployment", "worker"))
    assert "featuremaps-api-tokens" not in json.dumps(worker)


def test_dashboard_and_alerts_only_use_metrics_that_exist() -> None:
    from worker import metrics

    names = {m.name for m in metrics.REGISTRY.collect()}
    names |= {m.name for m in metrics.ModelLoads().collect()}
    names |= {f"featuremaps_worker_gpu_memory_{n}_bytes" for n in metrics.GpuStats.MEMORY}
    names.add(metrics.GpuStats.UTILIZATION)
    names |= set(re.findall(r"featuremaps_[a-z_]+", (ROOT / "api" / "metrics.py").read_text()))
    used = set(
        re.findall(
            r"featuremaps_[a-z_]+",
            (K8S / "monitoring").joinpath("featuremaps-dashboard.json").read_text(),
        )
    )
    rules = find(documents(K8S / "monitoring"), "PrometheusRule", "featuremaps")
    used |= set(
        re.findall(
            r"featuremaps_[a-z_]+",
            json.dumps([r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]),
        )
    )
    suffix = re.compile(r"_(bucket|sum|count|total)$")
    missing = {n for n in used if n not in names and suffix.sub("", n) not in names}
    assert not missing
    assert len(used) > 10
