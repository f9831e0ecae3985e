"""The real worker app with test-only faults, for ``celery -A tests.chaos.faulty_worker``.

Only the fault tests start workers from this module. It imports the production Celery app
unchanged and wraps a few functions so that a marker in an input's bytes makes the pool process
misbehave deterministically, the way a decoder crash, a hung computation or a deploy would:

    chaos:kill         SIGKILL the pool process running the job (every time it is delivered)
    chaos:slow         sleep until the soft time limit interrupts the task
    chaos:hold         block inside the pipeline until the test releases the gate
    chaos:hold-upload  block after the figure is uploaded, before the manifest

And a file in the gate directory, for faults that no input can carry:

    kill-before-finalize   SIGKILL the pool process once, right after a chunk recorded its
                           batch's last outcome and before it sends the finalize (the file
                           is removed first, so the redelivery goes through)
    kill-after-turn-end    SIGKILL the pool process once, right after a batch turn ended
                           (its successor registered with the scheduler) and before the
                           successor is sent

Whatever the input, a job or chunk task that raises records ``task-raised`` (e.g. Redis down
at its end).

Every manifest written is recorded as ``wrote:<key>`` (which attempt's folder wrote last).

Every event is appended to ``$CHAOS_GATE_DIR/events`` as ``<event> <pid>`` so a test can see
what happened in which process, and ``release`` in that directory opens every hold.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import worker.batches.tasks
import worker.compute.pipeline
import worker.tasks
from shared.storage import ObjectStore
from tests.chaos.faults import HOLD, HOLD_UPLOAD, KILL, SLOW
from worker.celery_app import app

__all__ = ["app"]

# No fault may leave a process waiting forever if a test dies halfway.
_MAX_WAIT_S = 120.0

_real_process_images = worker.compute.pipeline.process_images
_real_put_bytes = ObjectStore.put_bytes
_holding_upload = {"on": False}


def _gate() -> Path:
    return Path(os.environ["CHAOS_GATE_DIR"])


def _record(event: str) -> None:
    with (_gate() / "events").open("a") as fh:
        fh.write(f"{event} {os.getpid()}\n")


def _wait_for_release(event: str) -> None:
    _record(event)
    deadline = time.monotonic() + _MAX_WAIT_S
    while not (_gate() / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    _record(f"{event}-released")


def process_images(loaded, images, options, *, max_pixels: int, **kwargs):
    """The pipeline for single jobs (process_image calls it) and batch chunks alike."""
    data = b"".join(image for image in images if isinstance(image, bytes))
    _holding_upload["on"] = HOLD_UPLOAD in data
    if KILL in data:
        _record("kill")
        os.kill(os.getpid(), signal.SIGKILL)
    if SLOW in data:
        _record("slow")
        deadline = time.monotonic() + _MAX_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.05)
        _record("slow-not-interrupted")
    if HOLD in data and not _holding_upload["on"]:
        _wait_for_release("hold")
    return _real_process_images(loaded, images, options, max_pixels=max_pixels, **kwargs)


def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream"):
    manifest = key.endswith("/manifest.json")
    if _holding_upload["on"] and manifest:
        _wait_for_release("hold-upload")
    _real_put_bytes(self, key, data, content_type)
    if manifest:
        _record(f"wrote:{key}")


def _recording_raise(real):
    def run(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except Exception:
            _record("task-raised")
            raise

    return run


_real_finalize = worker.batches.tasks._finalize


def finalize(batch_id: str) -> None:
    armed = _gate() / "kill-before-finalize"
    if armed.exists():
        armed.unlink()
        _record("kill-before-finalize")
        os.kill(os.getpid(), signal.SIGKILL)
    _real_finalize(batch_id)


_real_end_turn = worker.batches.tasks._end_turn


def end_turn(held, turn: str) -> None:
    armed = _gate() / "kill-after-turn-end"
    if not armed.exists():
        return _real_end_turn(held, turn)
    successors = held.ctx.scheduler.end(turn, held.fence)
    armed.unlink()
    _record(f"kill-after-turn-end:{len(successors)}")
    os.kill(os.getpid(), signal.SIGKILL)


worker.compute.pipeline.process_images = process_images
worker.batches.tasks._end_turn = end_turn
worker.batches.tasks._finalize = finalize
ObjectStore.put_bytes = put_bytes
worker.tasks.run_job = _recording_raise(worker.tasks.run_job)
worker.batches.tasks.run_chunk = _recording_raise(worker.batches.tasks.run_chunk)
