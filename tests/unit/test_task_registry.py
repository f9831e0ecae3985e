"""The worker's tasks as a worker process sees them: every task module the Celery app
includes registers its tasks under their plain names, each a LeasedTask with its limits, and
importing the app is enough to connect the per-process set-up (the model loaded after the
fork)."""

from __future__ import annotations

import importlib
import weakref

from celery.signals import celeryd_after_setup, worker_process_init

from shared import queue
from worker import celery_app
from worker.leasing import LeasedTask

LONG = {
    queue.EXPAND_BATCH,
    queue.EXPAND_BATCH_SHARD,
    queue.FINALIZE_BATCH_SHARD,
    queue.RENDER_EXAMPLES,
}
SHORT = {queue.RENDER_JOB, queue.RUN_BATCH_CHUNK, queue.RUN_BATCH_TURN, queue.FINALIZE_BATCH}


def test_every_included_module_registers_leased_tasks_with_their_limits():
    for module in celery_app.app.conf.include:
        importlib.import_module(module)
    tasks = {name: t for name, t in celery_app.app.tasks.items() if name.startswith("featuremaps.")}
    assert set(tasks) == LONG | SHORT
    assert all(isinstance(t, LeasedTask) for t in tasks.values())
    soft, hard = celery_app.settings.expand_limits_s
    for name in LONG:
        assert (tasks[name].soft_time_limit, tasks[name].time_limit) == (soft, hard)
    for name in SHORT:
        assert tasks[name].soft_time_limit in (None, celery_app.settings.task_soft_time_limit_s)


def test_the_app_module_connects_the_per_process_set_up():
    def connected(signal) -> set:
        # Celery keeps weak references to the receivers.
        return {ref() if isinstance(ref, weakref.ref) else ref for _, ref in signal.receivers}

    assert celery_app._load_model in connected(worker_process_init)
    assert celery_app._remember_hostname in connected(celeryd_after_setup)
