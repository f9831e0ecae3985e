"""Code both sides use: settings, errors, job options, safe image decoding, the job store
and object storage. Nothing here imports torch or Celery."""
