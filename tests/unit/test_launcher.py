"""The per-GPU launcher: one Celery worker per GPU, pinned, concurrency 1, named by GPU; and
its supervisor, which restarts workers that exit and gives up on crash loops."""

import argparse
import os
import signal
import socket

import pytest

from worker.launcher import parse_gpus, worker_commands
from worker.supervisor import RestartPolicy, Supervisor, WorkerSpec


def test_one_worker_per_gpu_pinned_and_named():
    commands = worker_commands(["0", "1"], replicas=1, loglevel="INFO", queues="jobs")
    assert [hostname for hostname, _, _ in commands] == ["gpu0@%h", "gpu1@%h"]
    for gpu, (_, argv, env) in zip(["0", "1"], commands, strict=True):
        assert env["CUDA_VISIBLE_DEVICES"] == gpu
        assert argv[argv.index("--concurrency") + 1] == "1"
        assert argv[argv.index("--hostname") + 1] == f"gpu{gpu}@%h"


def test_cpu_workers_hide_gpus():
    commands = worker_commands([], replicas=2, loglevel="INFO", queues="jobs")
    assert [h for h, _, _ in commands] == ["cpu0@%h", "cpu1@%h"]
    assert all(env["CUDA_VISIBLE_DEVICES"] == "" for _, _, env in commands)
    # Two CPU workers split the cores rather than each taking all of them.
    per_worker = max(1, (os.cpu_count() or 1) // 2)
    assert [env["OMP_NUM_THREADS"] for _, _, env in commands] == [str(per_worker)] * 2


def test_each_worker_of_a_launcher_gets_its_own_metrics_port():
    commands = worker_commands(
        ["0", "1"], replicas=1, loglevel="INFO", queues="jobs", metrics_port=9100
    )
    assert [env["FEATUREMAPS_WORKER_METRICS_PORT"] for _, _, env in commands] == ["9100", "9101"]
    off = worker_commands(["0"], replicas=1, loglevel="INFO", queues="jobs")
    assert "FEATUREMAPS_WORKER_METRICS_PORT" not in off[0].env


def test_gpu_list_parsing():
    assert parse_gpus("0,1,3") == ["0", "1", "3"]
    assert parse_gpus("none") == []
    with pytest.raises(argparse.ArgumentTypeError):
        parse_gpus("first")


# --- supervision: a fake clock and fake worker processes drive the Supervisor ---------------


class FakeProcess:
    def __init__(self, spec: WorkerSpec, pid: int) -> None:
        self.spec = spec
        self.pid = pid
        self.code: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)

    def output_tail(self) -> list[str]:
        return [f"{self.spec.hostname} pid {self.pid}: CUDA error: out of memory"]


class World:
    """A Supervisor over fake processes; ``advance`` moves the clock and runs one check."""

    def __init__(self, names=("cpu0@%h", "cpu1@%h"), **policy) -> None:
        self.now = 1000.0
        self.spawned: list[FakeProcess] = []
        self.said: list[str] = []
        specs = [WorkerSpec(name, ["celery", "--hostname", name], {"X": name}) for name in names]
        self.supervisor = Supervisor(
            specs,
            spawn=self.spawn,
            policy=RestartPolicy(**policy),
            clock=lambda: self.now,
            sleep=self.advance,
            say=self.said.append,
        )

    def spawn(self, spec: WorkerSpec) -> FakeProcess:
        process = FakeProcess(spec, pid=100 + len(self.spawned))
        self.spawned.append(process)
        return process

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.supervisor.check()

    def current(self, name: str) -> FakeProcess:
        return [p for p in self.spawned if p.spec.hostname == name][-1]

    def crash(self, name: str, code: int = -9) -> None:
        self.current(name).code = code
        self.supervisor.check()

    def starts_of(self, name: str) -> int:
        return sum(p.spec.hostname == name for p in self.spawned)


def test_a_dead_worker_is_restarted_with_the_same_spec_after_the_backoff_the_other_untouched():
    world = World()
    world.supervisor.start()
    first, other = world.current("cpu0@%h"), world.current("cpu1@%h")
    world.crash("cpu0@%h", code=-9)
    assert "exited with code -9 (killed by SIGKILL)" in world.said[-1]
    assert "restarting it in 1s" in world.said[-1]
    world.advance(0.5)
    assert world.starts_of("cpu0@%h") == 1, "not before the backoff"
    world.advance(0.5)
    restarted = world.current("cpu0@%h")
    assert restarted is not first and restarted.spec == first.spec
    assert world.current("cpu1@%h") is other and other.signals == []
    assert not world.supervisor.done


def test_backoff_doubles_to_the_cap_and_resets_after_a_long_enough_run():
    world = World(backoff_s=1, max_backoff_s=4, reset_after_s=60, max_restarts=100)
    world.supervisor.start()
    delays = []
    for _ in range(5):
        world.crash("cpu0@%h")
        starts = world.starts_of("cpu0@%h")
        waited = 0.0
        while world.starts_of("cpu0@%h") == starts:
            world.advance(0.25)
            waited += 0.25
        delays.append(waited)
    assert delays == [1, 2, 4, 4, 4]
    world.advance(60)  # stayed up a minute: no longer crash-looping
    world.crash("cpu0@%h")
    assert "restarting it in 1s" in world.said[-1]


def test_a_crash_loop_is_given_up_on_with_a_clear_message_and_the_others_keep_running():
    world = World(backoff_s=1, max_backoff_s=1, max_restarts=3, window_s=60)
    world.supervisor.start()
    for _ in range(3):
        world.crash("cpu0@%h", code=1)
        world.advance(1)
    assert world.starts_of("cpu0@%h") == 4
    world.crash("cpu0@%h", code=1)
    message = next(m for m in world.said if "giving up" in m)
    host = socket.gethostname()
    assert f"giving up on cpu0@{host}" in message and "exited with code 1" in message
    assert "restarted 3 times in the last 60s" in message
    assert "pid 104: CUDA error: out of memory" in message, "its last output is shown"
    world.advance(100)
    assert world.starts_of("cpu0@%h") == 4, "never started again"
    assert world.starts_of("cpu1@%h") == 1 and world.current("cpu1@%h").code is None
    assert not world.supervisor.done


def test_restarts_spread_wider_than_the_window_are_not_a_crash_loop():
    world = World(backoff_s=1, max_backoff_s=1, reset_after_s=1000, max_restarts=2, window_s=60)
    world.supervisor.start()
    for _ in range(5):
        world.advance(45)
        world.crash("cpu0@%h")
        world.advance(1)
    assert world.starts_of("cpu0@%h") == 6
    assert not any("giving up" in m for m in world.said)


def test_when_every_worker_was_given_up_on_run_exits_non_zero():
    world = World(max_restarts=0)

    def crash_all(seconds: float) -> None:
        for process in world.spawned:
            if process.code is None:
                process.code = 2
        world.advance(seconds)

    world.supervisor.sleep = crash_all
    assert world.supervisor.run() == 1
    assert world.said[-1] == "featuremaps-worker: every worker was given up on; exiting"
    assert len(world.spawned) == 2


def test_shutdown_forwards_the_signal_restarts_nothing_and_exits_when_all_are_down():
    world = World()
    world.supervisor.start()
    world.crash("cpu0@%h")  # waiting for its restart when the shutdown comes
    world.supervisor.shutdown(signal.SIGTERM)
    running = world.current("cpu1@%h")
    assert running.signals == [signal.SIGTERM]
    assert world.current("cpu0@%h").signals == [], "an exited worker is not signalled"
    world.advance(60)
    assert world.starts_of("cpu0@%h") == 1 and not world.supervisor.done
    running.code = 0  # warm shutdown done
    world.advance(0.5)
    assert world.supervisor.done and world.supervisor.exit_code == 0


def test_a_worker_that_does_not_stop_cleanly_on_shutdown_sets_the_exit_code():
    world = World()
    world.supervisor.start()
    world.supervisor.shutdown(signal.SIGINT)
    assert [p.signals for p in world.spawned] == [[signal.SIGINT], [signal.SIGINT]]
    world.spawned[0].code, world.spawned[1].code = 0, 1
    world.advance(0.5)
    assert world.supervisor.done and world.supervisor.exit_code == 1


def test_a_worker_started_as_the_shutdown_comes_is_stopped_too():
    world = World()
    world.supervisor.start()
    world.crash("cpu0@%h")
    spawn = world.supervisor.spawn

    def spawn_then_signal(spec: WorkerSpec) -> FakeProcess:
        process = spawn(spec)
        world.supervisor.shutdown(signal.SIGTERM)  # lands while the restart is under way
        return process

    world.supervisor.spawn = spawn_then_signal
    world.advance(1)
    assert world.current("cpu0@%h").signals == [signal.SIGTERM]


def test_negative_restart_settings_are_refused():
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1)
    with pytest.raises(ValueError):
        RestartPolicy(backoff_s=-1)
