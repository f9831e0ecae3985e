"""The computation, free of Redis, S3 and Celery (a unit test keeps it so): the model, the
layers' maps, the figure, the precision modes. See docs/design.md "What it computes"."""
