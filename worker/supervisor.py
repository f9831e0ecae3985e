"""Keeps the launcher's worker processes running.

A worker that exits is started again with the same hostname, argv and environment, after a
delay that doubles from ``backoff_s`` up to ``max_backoff_s`` and starts over once the worker
has stayed up ``reset_after_s``. A worker restarted ``max_restarts`` times within
``window_s`` is crash-looping: it is given up on, with a message naming it, its exit code and
its last lines of output, and the others keep serving. When every worker has been given up
on, :meth:`Supervisor.run` returns 1.

:meth:`Supervisor.shutdown` (the launcher's SIGTERM/SIGINT handler) forwards the signal to
every running worker and cancels pending restarts; ``run`` returns once all are down.

Starting a process, the clock, sleeping and printing are passed in, so tests drive the
supervisor with fake processes and a fake clock.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, NamedTuple, Protocol

EXIT_ALL_GAVE_UP = 1
OUTPUT_TAIL_LINES = 20


class WorkerSpec(NamedTuple):
    """One worker process: Celery hostname (``%h`` is expanded by Celery), argv, extra env."""

    hostname: str
    argv: Sequence[str]
    env: Mapping[str, str]


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    # A worker that stayed up this long is not crash-looping: its next delay is backoff_s.
    reset_after_s: float = 60.0
    # More restarts than this within window_s and the worker is given up on.
    max_restarts: int = 5
    window_s: float = 300.0

    def __post_init__(self) -> None:
        if min(self.backoff_s, self.max_backoff_s, self.reset_after_s, self.window_s) < 0:
            raise ValueError("restart delays and windows cannot be negative")
        if self.max_restarts < 0:
            raise ValueError("--max-restarts cannot be negative")


class WorkerHandle(Protocol):
    pid: int

    def poll(self) -> int | None: ...

    def send_signal(self, signum: int) -> None: ...

    def output_tail(self) -> list[str]: ...


class WorkerProcess:
    """A worker started with ``subprocess``; its output is copied line by line to ``sink``
    (the launcher's stdout) and its last lines kept for the message when it is given up on."""

    def __init__(
        self, spec: WorkerSpec, env: Mapping[str, str], sink: IO[bytes] | None = None
    ) -> None:
        # argv from worker_commands (this interpreter running celery), no shell.
        self._popen = subprocess.Popen(  # nosec B603
            list(spec.argv),
            env={**env, **spec.env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.pid = self._popen.pid
        self._tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
        self._sink = sink if sink is not None else sys.stdout.buffer
        self._output = self._popen.stdout
        self._reader = threading.Thread(target=self._copy_output, daemon=True)
        self._reader.start()

    def _copy_output(self) -> None:
        for line in self._output or ():
            self._tail.append(line.decode(errors="replace").rstrip("\n"))
            self._sink.write(line)
            self._sink.flush()

    def poll(self) -> int | None:
        return self._popen.poll()

    def send_signal(self, signum: int) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(signum)

    def output_tail(self) -> list[str]:
        # Let the reader catch up with what the process wrote before it exited (bounded: a
        # pool process it left behind may keep the pipe open).
        self._reader.join(timeout=1.0)
        return list(self._tail)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"code {code} (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"code {code}"
    return f"code {code}"


@dataclass
class _Slot:
    spec: WorkerSpec
    name: str
    backoff_s: float
    process: WorkerHandle | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    restarts: deque[float] = field(default_factory=deque)
    # How it exited after a shutdown began.
    stop_code: int | None = None
    gave_up: bool = False


class Supervisor:
    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        *,
        spawn: Callable[[WorkerSpec], WorkerHandle],
        policy: RestartPolicy = RestartPolicy(),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        say: Callable[[str], None] | None = None,
        poll_s: float = 0.5,
    ) -> None:
        host = socket.gethostname()
        self.slots = [
            _Slot(spec, spec.hostname.replace("%h", host), policy.backoff_s) for spec in specs
        ]
        self.spawn = spawn
        self.policy = policy
        self.clock = clock
        self.sleep = sleep
        self.say = say or (lambda message: print(message, file=sys.stderr, flush=True))
        self.poll_s = poll_s
        self.stopping = False

    def start(self) -> None:
        for slot in self.slots:
            self._start(slot)

    def run(self) -> int:
        """Start every worker and keep them running until shutdown or until all gave up."""
        self.start()
        while not self.done:
            self.sleep(self.poll_s)
            self.check()
        return self.exit_code

    def check(self) -> None:
        """Notice workers that exited; start those whose restart delay is over."""
        now = self.clock()
        for slot in self.slots:
            if slot.process is not None:
                code = slot.process.poll()
                if code is not None:
                    self._exited(slot, code, now)
            elif slot.restart_at is not None and now >= slot.restart_at:
                slot.restarts.append(now)
                self._start(slot)

    def shutdown(self, signum: int) -> None:
        """Forward ``signum`` to every running worker; restart none of them any more.

        Safe in a signal handler: it prints nothing."""
        self.stopping = True
        for slot in self.slots:
            slot.restart_at = None
            if slot.process is not None:
                slot.process.send_signal(signum)

    @property
    def running(self) -> list[str]:
        return [slot.name for slot in self.slots if slot.process is not None]

    @property
    def done(self) -> bool:
        if self.stopping:
            return not self.running
        return all(slot.gave_up for slot in self.slots)

    @property
    def exit_code(self) -> int:
        if not self.stopping:
            return EXIT_ALL_GAVE_UP
        # A shutdown: the first worker that did not stop cleanly, if any.
        return next((slot.stop_code for slot in self.slots if slot.stop_code), 0)

    def _start(self, slot: _Slot) -> None:
        slot.process = self.spawn(slot.spec)
        slot.started_at = self.clock()
        slot.restart_at = None
        if self.stopping:  # the shutdown signal came while it was being started
            slot.process.send_signal(signal.SIGTERM)
        self.say(
            f"featuremaps-worker: started {slot.name} (pid {slot.process.pid}) "
            f"with {dict(slot.spec.env)}"
        )

    def _exited(self, slot: _Slot, code: int, now: float) -> None:
        process, slot.process = slot.process, None
        if self.stopping:
            slot.stop_code = code
            return
        policy = self.policy
        up_s = now - slot.started_at
        if up_s >= policy.reset_after_s:
            slot.backoff_s = policy.backoff_s
        while slot.restarts and now - slot.restarts[0] > policy.window_s:
            slot.restarts.popleft()
        if len(slot.restarts) >= policy.max_restarts:
            slot.gave_up = True
            tail = process.output_tail() if process is not None else []
            output = "\n".join(f"    {line}" for line in tail) or "    (no output)"
            self.say(
                f"featuremaps-worker: giving up on {slot.name}: it exited with "
                f"{describe_exit(code)} after {up_s:.1f}s, and was restarted "
                f"{len(slot.restarts)} times in the last {policy.window_s:.0f}s "
                f"(--max-restarts {policy.max_restarts}). Its last output:\n{output}"
            )
            if all(other.gave_up for other in self.slots):
                self.say("featuremaps-worker: every worker was given up on; exiting")
            else:
                self.say("featuremaps-worker: the other workers keep running")
            return
        delay = slot.backoff_s
        slot.restart_at = now + delay
        slot.backoff_s = min(delay * 2, policy.max_backoff_s)
        self.say(
            f"featuremaps-worker: {slot.name} (pid {process.pid if process else '?'}) exited "
            f"with {describe_exit(code)} after {up_s:.1f}s; restarting it in {delay:g}s"
        )
