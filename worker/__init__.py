"""The worker side: the feature-map pipeline (plain functions: model, features, render,
pipeline), the Celery app and its thin tasks, and the per-GPU launcher."""
