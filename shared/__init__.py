"""Code both sides use: settings, errors, job options, safe image and archive reading, the
record stores (``records``, ``jobs``, ``batches``) and object storage. Nothing here imports
torch; Celery only in ``queue`` (the send-only producer and the publish hook, which the
workers load too)."""
