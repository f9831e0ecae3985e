"""Recovery of work held by lost nodes: a worker killed outright (OOM, a preempted node, power)
leaves its message unacknowledged in kombu's ``unacked`` hash, where Celery would leave it until
``VISIBILITY_TIMEOUT_S`` (600 s). Every task holds a lease naming its pool process
(shared/leases.py); once that process's heartbeat has expired (``HEARTBEAT_TTL_S``, 15 s), the
task's own message is moved back to the front of its queue with a new delivery tag, in one Lua
compare-and-set that also clears the lease, and the next free worker takes it over.

The keeper (keeper/runner.py: in every API process and every worker process) calls
:func:`maybe_recover` every :data:`RECOVERY_EVERY_S` on a thread; a short Redis lock lets one
of them look per period, so work is handed back even while no worker runs at all. Work is found lost
at most ``HEARTBEAT_TTL_S + RECOVERY_EVERY_S`` (17 s) after its process died;
docs/reliability.md has the figures measured.
"""

from __future__ import annotations

import logging

from redis import Redis

from keeper.counters import HANDOVER, count
from shared.leases import Lease, LeaseStore
from shared.queue import find_unacked
from shared.records import PREFIX

log = logging.getLogger(__name__)

LOCK_KEY = f"{PREFIX}:recovery:lock"
RECOVERY_EVERY_S = 2.0


def recover(redis: Redis, leases: LeaseStore) -> dict[str, str]:
    """Hand over the work of every lease whose holder's heartbeat is gone; returns each such
    task id with the outcome (``moved``; ``released`` when its message was not
    unacknowledged, e.g. already requeued by its node after its pool process died; ``alive``
    or ``changed`` when the holder beat again or another delivery took the lease meanwhile)."""
    outcomes = {}
    for lease in leases.orphaned():
        outcome = leases.hand_over(lease, find_unacked(redis, lease.task_id))
        outcomes[lease.task_id] = outcome
        _report(redis, lease, outcome)
    return outcomes


def _report(redis: Redis, lease: Lease, outcome: str) -> None:
    if outcome == "moved":
        count(redis, HANDOVER, lease.task.removeprefix("featuremaps."))
        log.warning(
            "task %s (%s) held by %s, whose heartbeat expired: handed over to the front of "
            "its queue",
            lease.task_id,
            lease.task,
            lease.holder,
        )
    else:
        log.info("lease of task %s held by %s: %s", lease.task_id, lease.holder, outcome)


def maybe_recover(redis: Redis, leases: LeaseStore, holder: str) -> dict[str, str] | None:
    """Recover unless another worker did in this period; None when it was not our turn."""
    if not redis.set(LOCK_KEY, holder, nx=True, px=int(RECOVERY_EVERY_S * 1000)):
        return None
    return recover(redis, leases)
