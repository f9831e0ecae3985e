"""The one spelling of each process's command line (stack/commands.py)."""

from __future__ import annotations

import sys

from stack.commands import API_APP, CELERY_APP, api_command, cpu_worker_env, worker_command


def test_api_command_is_gunicorn_on_this_interpreter():
    argv = api_command("127.0.0.1:8000")
    assert argv[:3] == [sys.executable, "-m", "gunicorn"]
    assert argv[argv.index("--bind") + 1] == "127.0.0.1:8000"
    assert "--config" not in argv and "--timeout" not in argv
    assert argv[-1] == API_APP
    tuned = api_command("0.0.0.0:1", workers=1, timeout_s=60, config="python:x", app="m:app")
    assert tuned[tuned.index("--workers") + 1] == "1"
    assert tuned[tuned.index("--timeout") + 1] == "60"
    assert tuned[tuned.index("--config") + 1] == "python:x"
    assert tuned[-1] == "m:app"


def test_worker_command_names_its_host_and_queues():
    argv = worker_command("w1@host", queues="jobs", loglevel="WARNING")
    assert argv[argv.index("-A") + 1] == CELERY_APP
    assert argv[argv.index("--hostname") + 1] == "w1@host"
    assert argv[argv.index("-Q") + 1] == "jobs"
    assert argv[argv.index("--concurrency") + 1] == "1"
    assert worker_command("w@h", app="tests.x")[4] == "tests.x"


def test_cpu_workers_share_the_cores():
    one, two = cpu_worker_env(1), cpu_worker_env(2)
    assert one["CUDA_VISIBLE_DEVICES"] == "" and one["FEATUREMAPS_DEVICE"] == "cpu"
    assert int(two["OMP_NUM_THREADS"]) == max(1, int(one["OMP_NUM_THREADS"]) // 2)
