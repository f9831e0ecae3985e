"""The worker side: ``compute/`` (the computation, free of Redis, S3 and Celery), ``batches/``
(a batch's life), and around them the Celery app and the job task, how every task holds its
lease and ends, per-process state, recovery, retention, result reuse, webhook delivery,
metrics and the per-GPU launcher. docs/design.md "Shape" has the map."""
