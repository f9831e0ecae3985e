"""Benchmarks, run with ``python -m bench`` (``make bench``); one module per section."""
