"""Sending storage retries again once their backoff is over (shared/delayed.py). Every keeper
(keeper/runner.py) calls :func:`send_due` every ``SEND_DUE_EVERY_S``: taking a due retry is
one script, so any number of keepers share the set, and the API's alone still send them while
no worker runs."""

from __future__ import annotations

import logging
import time

from redis import Redis

from keeper.reconciler import Send
from shared.delayed import SEND_DUE_EVERY_S, TAKE_AT_MOST, hold_back, take_due

log = logging.getLogger(__name__)


def send_due(redis: Redis, send: Send, *, now: float | None = None) -> int:
    """Send every retry due at ``now``; returns how many. One that cannot be sent (the broker
    refusing) is kept, due again a period later, with those not sent yet."""
    sent = 0
    while True:
        due = take_due(redis, time.time() if now is None else now)
        for n, retry in enumerate(due):
            try:
                send(
                    retry.task,
                    args=retry.args,
                    queue=retry.queue,
                    priority=retry.priority,
                    task_id=retry.task_id,
                    retries=retry.retries,
                    sent_at=retry.sent_at,
                )
            except Exception:
                for unsent in due[n:]:
                    hold_back(redis, unsent, time.time() + SEND_DUE_EVERY_S)
                raise
            log.info("%s %s: storage retry %d sent", retry.task, retry.task_id, retry.retries)
            sent += 1
        if len(due) < TAKE_AT_MOST:
            return sent
