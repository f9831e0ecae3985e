"""worker/guard.py without a broker: how a task ends when its work raises."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery.exceptions import Reject, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.errors import StorageUnavailable
from shared.leases import LeaseLost
from shared.settings import Settings
from worker.guard import HANDED_OVER, RETRYING, guarded

SETTINGS = Settings(storage_retries=2, storage_retry_backoff_s=0.5, task_soft_time_limit_s=7)


class _Task:
    """The part of a bound Celery task the guard uses."""

    def __init__(self, retries: int = 0, soft_time_limit: int | None = None) -> None:
        self.request = SimpleNamespace(retries=retries)
        self.soft_time_limit = soft_time_limit


def _nothing_held_back(delay_s: float) -> None:
    raise AssertionError(f"held back for {delay_s}s")


def _raise(exc: BaseException):
    def work():
        raise exc

    return work


def _run(task: _Task, work, **kwargs):
    ended: list[tuple[str, str]] = []
    notes: list[str] = []
    kwargs.setdefault("hold_back", _nothing_held_back)
    result = guarded(
        task,
        SETTINGS,
        work,
        what="job j1",
        give_up=lambda code, message: ended.append((code, message)),
        retrying=notes.append,
        **kwargs,
    )
    return result, ended, notes


def test_work_that_returns_is_passed_through():
    assert _run(_Task(), lambda: "succeeded") == ("succeeded", [], [])


def test_storage_errors_retry_with_exponential_backoff_and_note_it():
    held: list[float] = []
    result, ended, notes = _run(
        _Task(retries=1), _raise(StorageUnavailable("S3 is down")), hold_back=held.append
    )
    # The delivery ends; the retry waits out its backoff in Redis (shared/delayed.py).
    assert result == RETRYING and ended == [] and held == [1.0]
    assert notes == ["storage unavailable, retry 2 in 1s"]


def test_a_retry_that_cannot_be_kept_requeues_instead_of_dropping_the_message():
    def hold_back(delay_s: float) -> None:
        raise RedisConnectionError("gone")

    with pytest.raises(Reject) as raised:
        _run(_Task(), _raise(StorageUnavailable("S3 is down")), hold_back=hold_back)
    assert raised.value.requeue is True


def test_storage_errors_past_the_budget_give_up():
    result, ended, notes = _run(_Task(retries=2), _raise(StorageUnavailable("S3 is down")))
    assert result == "failed" and notes == []
    assert ended == [("storage_unavailable", "S3 is down (gave up after 2 retries)")]


def test_redis_errors_reject_with_requeue():
    with pytest.raises(Reject) as raised:
        _run(_Task(), _raise(RedisConnectionError("gone")))
    assert raised.value.requeue is True


def test_a_publish_the_broker_refused_rejects_with_requeue_and_gives_nothing_up():
    # What celery's send_task raises when kombu cannot publish (not a RedisError).
    ended: list = []
    with pytest.raises(Reject) as raised:
        guarded(
            _Task(),
            SETTINGS,
            _raise(OperationalError("Error 111 connecting to 127.0.0.1:6379")),
            what="chunk c1",
            give_up=lambda code, message: ended.append(code),
            hold_back=_nothing_held_back,
        )
    assert raised.value.requeue is True and ended == []


def test_time_limit_gives_up_as_timeout_naming_the_subject_and_the_limit():
    _, ended, _ = _run(_Task(), _raise(SoftTimeLimitExceeded()), subject="the job")
    assert ended == [("timeout", "the job ran past its time limit of 7s")]
    _, ended, _ = _run(_Task(soft_time_limit=3), _raise(SoftTimeLimitExceeded()))
    assert ended == [("timeout", "job j1 ran past its time limit of 3s")]


def test_a_bug_gives_up_as_internal_error():
    result, ended, _ = _run(_Task(), _raise(KeyError("x")))
    assert result == "failed" and ended == [("internal_error", "KeyError: 'x'")]


def test_work_handed_over_records_nothing_more():
    result, ended, notes = _run(_Task(), _raise(LeaseLost("job j1")))
    assert result == HANDED_OVER and ended == [] and notes == []


def test_a_give_up_refused_by_the_fence_ends_as_handed_over():
    def give_up(code: str, message: str) -> None:
        raise LeaseLost("job j1")

    result = guarded(
        _Task(),
        SETTINGS,
        _raise(KeyError("x")),
        what="job j1",
        give_up=give_up,
        hold_back=_nothing_held_back,
    )
    assert result == HANDED_OVER


def test_a_give_up_that_cannot_be_recorded_requeues_instead_of_dropping_the_message():
    # Redis down just as a bug (or the time limit) is being recorded: before, the RedisError
    # escaped the task and Celery dropped the message, leaving the record running for ever.
    def give_up(code: str, message: str) -> None:
        raise RedisConnectionError("gone")

    for fault in (KeyError("x"), SoftTimeLimitExceeded(), StorageUnavailable("S3 is down")):
        with pytest.raises(Reject) as raised:
            guarded(
                _Task(retries=5),
                SETTINGS,
                _raise(fault),
                what="job j1",
                give_up=give_up,
                hold_back=_nothing_held_back,
            )
        assert raised.value.requeue is True, fault
