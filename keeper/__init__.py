"""The keeper: what keeps every record moving when a signal is lost or no worker runs.

It runs wherever something always runs: in every gunicorn process of the API
(api/gunicorn_conf.py) and in every worker process (worker/runtime.py), started by
:func:`keeper.runner.start_keeper`. Nothing in it imports worker code or torch, so the API
image carries it.

- ``recovery``: the hand-over of work held by lost nodes (leases whose holder's heartbeat
  expired), every 2 s under a Redis lock.
- ``reconciler``: a periodic sweep under its own lock that checks that every record still to
  move has something that will move it, and repairs what has not.
- ``webhook_delivery``: the outbox's deliverer.
- ``backlog``: what waits for a worker, for the API's gauges and the autoscaler.
- ``counters``: the keeper's counts (handovers, repairs), kept in Redis for the API's /metrics.

docs/reliability.md ("The keeper") has the contract.
"""
