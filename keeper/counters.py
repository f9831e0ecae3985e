"""What the keeper counts, kept in Redis: work of lost nodes handed over (by task) and lost
signals repaired (by kind). The keeper runs in the API's processes and in every worker, and
whichever process holds the period's lock does the work, so a per-process Prometheus counter
would be scattered over processes that come and go; one Redis hash keeps one exact total that
the API's ``/metrics`` renders (``featuremaps_handovers_total{task}``,
``featuremaps_reconciler_repairs_total{kind}``; api/metrics.py)."""

from __future__ import annotations

from redis import Redis

from shared.records import PREFIX, text

COUNTERS_KEY = f"{PREFIX}:stats:keeper"
HANDOVER = "handover"
REPAIR = "repair"
# Series present from the start, at zero, so that rate() sees the first one.
HANDOVER_TASKS = (
    "render_job",
    "run_batch_chunk",
    "run_batch_turn",
    "expand_batch",
    "expand_batch_shard",
    "finalize_batch",
    "finalize_batch_shard",
    "render_examples",
)
REPAIR_KINDS = (
    "job_requeued",
    "job_restored",
    "batch_restored",
    "expand",
    "finalize",
    "webhook",
    "turn_resent",
    "turn_added",
)


def count(redis: Redis, what: str, label: str, n: int = 1) -> None:
    """Add ``n`` to counter ``what`` (HANDOVER, REPAIR) for ``label`` (a task, a kind)."""
    if n:
        redis.hincrby(COUNTERS_KEY, f"{what}:{label}", n)


def counts(redis: Redis, what: str) -> dict[str, int]:
    """Counter ``what`` by label, every known label included."""
    known = HANDOVER_TASKS if what == HANDOVER else REPAIR_KINDS
    out = dict.fromkeys(known, 0)
    for field, value in redis.hgetall(COUNTERS_KEY).items():
        kind, _, label = text(field).partition(":")
        if kind == what:
            out[label] = int(value)
    return out
