"""The Redis lists a queue lives in, as the API's gauges and the KEDA scaler count them, are
the lists kombu's Redis transport really uses under the broker options of the Celery app."""

from kombu.transport.redis import Channel

from shared.queue import PRIORITY_SEP, QUEUES, SENT_AT_HEADER, broker_options, queue_keys
from shared.settings import Settings
from worker.celery_app import app


def test_queue_keys_are_the_lists_kombu_files_every_priority_under():
    options = app.conf.broker_transport_options
    assert options["sep"] == PRIORITY_SEP
    # A channel configured as kombu's Channel.__init__ does it, without connecting.
    channel = Channel.__new__(Channel)
    for name in Channel.from_transport_options:
        if name in options:
            setattr(channel, name, options[name])
    for queue in QUEUES:
        used = {channel._q_for_pri(queue, priority) for priority in range(10)}
        assert used == set(queue_keys(queue, options))
    assert queue_keys("jobs", options) == [
        "jobs",
        "jobs\x06\x163",
        "jobs\x06\x166",
        "jobs\x06\x169",
    ]


def test_the_api_producer_and_the_workers_agree_on_the_keys():
    from shared.queue import make_producer

    producer = make_producer(Settings())
    api_options = producer.conf.broker_transport_options
    for queue in QUEUES:
        assert queue_keys(queue, api_options) == queue_keys(queue, broker_options(Settings()))
        assert queue_keys(queue, api_options) == queue_keys(
            queue, app.conf.broker_transport_options
        )


def test_messages_are_stamped_with_the_time_they_were_sent():
    from celery.signals import before_task_publish

    headers: dict = {}
    before_task_publish.send(sender="featuremaps.render_job", headers=headers, body=None)
    assert isinstance(headers[SENT_AT_HEADER], float)
    first = headers[SENT_AT_HEADER]
    before_task_publish.send(sender="featuremaps.render_job", headers=headers, body=None)
    assert headers[SENT_AT_HEADER] == first
