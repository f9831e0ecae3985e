"""A batch's life on the worker, one module per stage: ``expand`` (the source into items,
with ``checkpoints``), ``chunks`` (a chunk of items through the model), ``finalize`` (the
result shards, ``result_shards``), and the thin Celery tasks that call them (``tasks``).
This module holds what the stages share; how work is handed on (``Dispatch``, ``Finalize``,
``ExpandShard``) is injected, so tests and benchmarks run the stages without Celery.
docs/design.md "Expansion" and "Batch results" have the contracts.
"""

from __future__ import annotations

from collections.abc import Callable

# Storage round trips overlap well; the model pass itself uses torch's own threads.
IO_THREADS = 8

# How work is handed on: in a worker, tasks sent by name (worker/batches/tasks.py); in tests
# and benchmarks, plain calls.
# Dispatch: a block's queued item ids, to be run (in a worker, chunked and handed to the
# scheduler, shared/schedule.py).
Dispatch = Callable[[str, list[str]], None]
Finalize = Callable[[str], None]
# (batch id, shard, generation): an expansion shard's task, or its continuation.
ExpandShard = Callable[[str, int, int], None]
