"""Starting the keeper in a process: daemon threads for the recovery of lost nodes' work
(keeper/recovery.py, every 2 s), storage retries sent again once due (keeper/retries.py,
every second), the reconciler (keeper/reconciler.py, every
``RECONCILE_EVERY_S``), the restore of records lost after their 202 (keeper/restore.py, every
``RESTORE_EVERY_S``) and, with a webhook secret, webhook delivery
(keeper/webhook_delivery.py). Each gunicorn process of the API starts it
(api/gunicorn_conf.py), and so does each worker process (worker/runtime.py): a Redis lock per
period lets one process of all of them recover, one reconcile and one restore, and every
deliverer takes entries from the one outbox (and every keeper due retries from their one set),
so with workers scaled to zero the API still does all of it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kombu.exceptions import OperationalError
from redis import Redis
from redis.exceptions import RedisError

from keeper.reconciler import Reconciler, Send, maybe_reconcile
from keeper.recovery import RECOVERY_EVERY_S, maybe_recover
from keeper.restore import maybe_restore_unpolled
from keeper.retries import send_due
from keeper.webhook_delivery import Deliverer, webhook_loop
from shared.delayed import SEND_DUE_EVERY_S
from shared.errors import FeatureMapsError
from shared.leases import LeaseStore
from shared.settings import Settings
from shared.storage import ObjectStore

log = logging.getLogger(__name__)


def start_keeper(
    redis: Redis, store: ObjectStore, settings: Settings, *, send: Send, holder: str
) -> None:
    """Start the keeper's threads in this process; ``holder`` names it in the locks."""
    leases = LeaseStore(redis, ttl_s=settings.visibility_timeout_s)
    reconciler = Reconciler(redis, settings, send)
    for period_s, work, what in (
        (RECOVERY_EVERY_S, lambda: maybe_recover(redis, leases, holder), "recovery of lost work"),
        (SEND_DUE_EVERY_S, lambda: send_due(redis, send), "storage retries"),
        (settings.reconcile_every_s, lambda: maybe_reconcile(reconciler, holder), "reconciler"),
        (
            settings.restore_every_s,
            lambda: maybe_restore_unpolled(redis, store, settings, send, holder),
            "restore of lost records",
        ),
    ):
        threading.Thread(
            target=periodically, args=(period_s, work, what), daemon=True, name=f"keeper {what}"
        ).start()
    if settings.webhook_secret:
        deliverer = Deliverer(redis, store, settings)
        threading.Thread(
            target=webhook_loop, args=(deliverer,), daemon=True, name="keeper webhooks"
        ).start()
    log.info("keeper started in %s (recovery, retries, reconciler, restore, webhooks)", holder)


def periodically(period_s: float, work: Callable[[], object], what: str) -> None:
    """Call ``work`` every ``period_s`` seconds, forever. A dependency that is down (Redis
    restarting, storage away, the broker refusing a publish) is logged and tried again next
    period; a bug is logged with its traceback and does not end the thread either."""
    while True:
        try:
            work()
        except (FeatureMapsError, RedisError, OperationalError) as exc:
            log.warning("%s failed: %s", what, exc)
        except Exception:
            log.exception("%s failed", what)
        time.sleep(period_s)
