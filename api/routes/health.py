"""Operational endpoints: liveness, readiness, Prometheus metrics, the backlog the autoscaler
reads, the OpenAPI document."""

from __future__ import annotations

from flask import Blueprint, Response

from api.metrics import render_metrics
from api.openapi import openapi_document
from api.services import services
from keeper.backlog import backlog as read_backlog
from shared.heartbeat import live_workers

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    svc = services()
    checks: dict[str, dict] = {}
    try:
        svc.redis.ping()
        workers = live_workers(svc.redis)
        checks["redis"] = {"ok": True}
        checks["workers"] = {
            "ok": bool(workers),
            "count": len(workers),
            "hostnames": sorted({w["hostname"] for w in workers}),
        }
    except Exception as exc:  # readiness reports every failure instead of raising
        checks["redis"] = {"ok": False, "error": str(exc)}
        checks["workers"] = {"ok": False, "error": "unknown while Redis is down"}
    try:
        svc.store.ping()
        checks["storage"] = {"ok": True}
    except Exception as exc:  # readiness reports every failure instead of raising
        checks["storage"] = {"ok": False, "error": str(exc)}
    required = {"redis", "storage"}
    if svc.settings.readyz_requires_worker:
        required.add("workers")
    ready = all(checks[name]["ok"] for name in required)
    return {"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503


@bp.get("/metrics")
def metrics():
    body, content_type = render_metrics(services())
    return Response(body, content_type=content_type)


@bp.get("/backlog")
def backlog():
    """What waits for a worker (keeper/backlog.py), for KEDA's metrics-api trigger: counts
    only, no ids, unauthenticated like /metrics (cluster-internal; docs/deploy.md)."""
    svc = services()
    return read_backlog(svc.redis, svc.settings)


@bp.get("/openapi.json")
def openapi():
    return openapi_document(services().settings.enabled_models)
