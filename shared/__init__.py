"""Code the API and the workers both use: settings, errors, job options, safe image and
archive reading, the Redis record stores (``records``; ``jobs``, ``batches``), leases and
heartbeats, the send-only Celery producer (``queue``), webhooks' shared parts and object
storage. Nothing here imports torch, and only ``queue`` imports Celery."""
