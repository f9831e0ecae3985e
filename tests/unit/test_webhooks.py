"""The webhook rules that need no network: the signature's bytes, which literal addresses a
callback may reach, the item_callbacks field and item entries (shared/webhooks.py)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from shared.errors import CallbackRefused, InvalidOption, MissingField
from shared.settings import Settings
from shared.webhooks import (
    accepted_callback_url,
    accepted_item_callbacks,
    check_callback_url,
    item_entry,
    signature,
    split_item_entry,
)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body():
    body = b'{"id": "abc", "status": "succeeded"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature("k", 1700000000, body) == f"t=1700000000,v1={expected}"


def test_a_public_address_keeps_its_path_query_and_port():
    target = check_callback_url("https://8.8.8.8:8443/hooks/fm?x=1", allow_private=False)
    assert (target.scheme, target.host, target.port) == ("https", "8.8.8.8", 8443)
    assert (target.path, target.address) == ("/hooks/fm?x=1", "8.8.8.8")
    assert check_callback_url("http://1.1.1.1", allow_private=False).path == "/"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "[::1]",
        "[fe80::1]",
        "[fc00::1]",
        "[::ffff:10.0.0.1]",
    ],
)
def test_addresses_that_are_not_public_are_refused_unless_allowed(host):
    with pytest.raises(CallbackRefused, match="public addresses only"):
        check_callback_url(f"http://{host}/x", allow_private=False)
    assert check_callback_url(f"http://{host}/x", allow_private=True).path == "/x"


def test_an_empty_callback_is_none_and_one_without_a_secret_is_refused():
    assert accepted_callback_url("", Settings(webhook_secret="k")) is None
    assert accepted_callback_url(None, Settings()) is None
    with pytest.raises(CallbackRefused, match="WEBHOOK_SECRET"):
        accepted_callback_url("http://8.8.8.8/", Settings())
    with pytest.raises(CallbackRefused, match="string"):
        accepted_callback_url(["http://8.8.8.8/"], Settings(webhook_secret="k"))


def test_the_delivery_loop_outlives_a_failing_attempt_and_redis_going_away():
    from redis.exceptions import ConnectionError as RedisConnectionError

    from keeper.webhook_delivery import IDLE_S, webhook_loop

    outcomes = [RuntimeError("a bug"), RedisConnectionError("restarting"), True, False]
    slept: list[float] = []

    class Deliverer:
        def idle_for(self):
            return IDLE_S

        def deliver_due(self):
            outcome = outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

    class Stop(Exception):
        pass

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if not outcomes:
            raise Stop

    with pytest.raises(Stop):
        webhook_loop(Deliverer(), sleep=sleep)
    assert slept == [IDLE_S, IDLE_S, IDLE_S]  # no pause after a delivery that was made


def test_item_callbacks_are_a_boolean_that_needs_a_callback_url():
    settings = Settings(webhook_secret="k", webhook_item_rate=4)
    url = "http://8.8.8.8/hook"
    assert accepted_item_callbacks(True, url, settings) == 0.25
    assert accepted_item_callbacks(" TRUE ", url, settings) == 0.25
    for off in (None, "", "false", "0", False):
        assert accepted_item_callbacks(off, url, settings) == 0.0
        assert accepted_item_callbacks(off, None, settings) == 0.0
    with pytest.raises(MissingField, match="needs a callback_url"):
        accepted_item_callbacks("true", None, settings)
    with pytest.raises(InvalidOption, match="item_callbacks must be true or false"):
        accepted_item_callbacks("ja", url, settings)


def test_item_entries_name_their_batch_and_item():
    entry = item_entry("featuremaps:batch:b1", "b1-000007")
    assert split_item_entry(entry) == ("featuremaps:batch:b1", "b1-000007")
    assert split_item_entry("featuremaps:job:j1") is None
