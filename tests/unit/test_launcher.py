"""The per-GPU launcher: one Celery worker per GPU, pinned, concurrency 1, named by GPU."""

import argparse
import os

import pytest

from worker.launcher import parse_gpus, worker_commands


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


def test_gpu_list_parsing():
    assert parse_gpus("0,1,3") == ["0", "1", "3"]
    assert parse_gpus("none") == []
    with pytest.raises(argparse.ArgumentTypeError):
        parse_gpus("first")
