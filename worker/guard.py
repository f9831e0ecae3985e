"""The one way every task ends: what a task does when its work raises instead of returning.

- Storage unavailable: retried with exponential backoff (``STORAGE_RETRY_BACKOFF_S · 2^n``,
  ``STORAGE_RETRIES`` times); once retries run out the work is given up on as
  ``storage_unavailable``. The retry waits out its backoff in Redis (``hold_back``,
  shared/delayed.py), not in a worker's hands, and this delivery ends (:data:`RETRYING`): the
  keeper sends it again when it is due.
- Redis unavailable, as a Redis client error or as the broker's (kombu's
  ``OperationalError``, which a ``send_task`` that cannot publish raises and which is not a
  ``RedisError``): the message is rejected *with requeue*. A plain failure would make Celery
  reject it without requeueing (``acks_on_failure_or_timeout`` is off) and the record would stay
  ``running`` for ever once Redis is back; with Redis still down the message stays
  unacknowledged and comes back after the visibility timeout. The stores count the redelivery.
- The soft time limit: given up on as ``timeout``.
- Anything else (a bug): logged and given up on as ``internal_error``.

"Given up on" means the caller's ``give_up(code, message)`` ends the work's record ``failed``
(a job, a chunk's items, a batch's expansion or manifest), so nothing waits for it for ever.
A give-up that cannot be recorded (Redis down at that moment) rejects the message *with
requeue* too: an exception escaping the task would make Celery drop the message
(``reject(requeue=False)``) and leave the record running for ever.

Whatever happens, a delivery whose work was handed over to another worker (its record's move
raised :class:`LeaseLost`, worker/leasing.py) records nothing more: it returns
:data:`HANDED_OVER`, and its message is acknowledged.
Tests exercise it without a broker through a stand-in task (``request.retries``, ``retry``,
``soft_time_limit``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery.exceptions import Reject, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerUnavailable
from redis.exceptions import RedisError

from shared.errors import INTERNAL_ERROR, TIMEOUT, StorageUnavailable
from shared.leases import LeaseLost
from shared.settings import Settings

log = logging.getLogger(__name__)

GiveUp = Callable[[str, str], object]
HANDED_OVER = "handed_over"
# What a delivery returns when its work waits for a storage retry: it has not ended.
RETRYING = "retrying"


def guarded(
    task: Any,
    settings: Settings,
    work: Callable[[], object],
    *,
    what: str,
    give_up: GiveUp,
    hold_back: Callable[[float], object],
    retrying: Callable[[str], object] | None = None,
    subject: str | None = None,
) -> object:
    """Run ``work()`` for the bound Celery ``task`` and return what it returns, "failed"
    once ``give_up(code, message)`` has ended the work, or :data:`RETRYING` once
    ``hold_back(delay)`` has kept the task to be sent again in ``delay`` seconds.

    ``what`` names the work in logs (and, unless ``subject`` is given, in the time-limit
    message); ``retrying(reason)``, when given, records on the work's record that it waits for
    a storage retry.
    """
    try:
        return _ended(task, settings, work, what, give_up, hold_back, retrying, subject)
    except LeaseLost as exc:
        log.warning(
            "%s: handed over to another worker; its outcome here is dropped (%s)", what, exc
        )
        return HANDED_OVER


def _ended(
    task: Any,
    settings: Settings,
    work: Callable[[], object],
    what: str,
    give_up: GiveUp,
    hold_back: Callable[[float], object],
    retrying: Callable[[str], object] | None,
    subject: str | None,
) -> object:
    try:
        return work()
    except StorageUnavailable as exc:
        retries = task.request.retries or 0
        if retries >= settings.storage_retries:
            return _give_up(give_up, exc.code, f"{exc.message} (gave up after {retries} retries)")
        delay = settings.storage_retry_backoff_s * 2**retries
        log.warning("%s: storage unavailable, retry %d in %.1fs", what, retries + 1, delay)
        try:
            if retrying is not None:
                retrying(f"storage unavailable, retry {retries + 1} in {delay:g}s")
            hold_back(delay)
        except (RedisError, BrokerUnavailable) as down:
            raise Reject(down, requeue=True) from down
        return RETRYING
    except (RedisError, BrokerUnavailable) as exc:
        # A publish that failed mid-work (a chunk's next message, a finalize) is not a bug:
        # the work is done again from its last recorded step once the broker answers.
        raise Reject(exc, requeue=True) from exc
    except LeaseLost:
        raise
    except SoftTimeLimitExceeded:
        limit = task.soft_time_limit or settings.task_soft_time_limit_s
        return _give_up(give_up, TIMEOUT, f"{subject or what} ran past its time limit of {limit}s")
    except Exception as exc:
        log.exception("%s failed unexpectedly", what)
        return _give_up(give_up, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")


def _give_up(give_up: GiveUp, code: str, message: str) -> str:
    """``give_up(code, message)``; when that cannot be recorded, the message goes back to its
    queue instead of being dropped with the record left open."""
    try:
        give_up(code, message)
    except LeaseLost:
        raise
    except Exception as exc:
        log.exception("could not record giving up (%s); the message goes back to its queue", code)
        raise Reject(exc, requeue=True) from exc
    return "failed"
