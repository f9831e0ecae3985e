"""Batches on the worker side: what the stages share. A batch's life, stage by stage:

- ``worker/batches/expand.py``: the source (an archive read by ranged GETs, or the keys under an S3
  prefix) is cut into shards that expand in parallel, block by block of 128 members: one
  pack object per block holds its image members' bytes, the items are recorded and their
  chunks dispatched while expansion continues; every shard checkpoints after each block and
  hands on to a continuation of itself after ``EXPAND_SLICE_S``.
- ``worker/batches/chunks.py``: a chunk requests all its inputs in parallel (ranged GETs into the
  packs), runs them through the model in tensor batches
  (:func:`worker.compute.pipeline.process_images`; on the CPU in slices of ``CPU_MODEL_BATCH``, each
  starting as soon as its inputs are in, while the previous slice's outputs upload), and
  records all outcomes in one atomic step.
- ``worker/batches/finalize.py``: whoever records the batch's last outcome has the manifest and the
  bundle of figures written (``BatchStore`` makes that exactly one caller), and then, unless
  ``KEEP_INPUTS``, the uploaded archive and the items' expanded inputs deleted: no item can run
  again once the batch is complete.

Plain functions that the thin tasks in ``worker/batches/tasks.py`` call; how work is handed on
(``Dispatch``, ``Finalize``) is injected, so tests and benchmarks run them without Celery.
"""

from __future__ import annotations

from collections.abc import Callable

# Storage round trips overlap well; the model pass itself uses torch's own threads.
IO_THREADS = 8

# How work is handed on: in a worker, tasks sent by name (worker/batches/tasks.py); in tests
# and benchmarks, plain calls.
Dispatch = Callable[[str, list[str]], None]
Finalize = Callable[[str], None]
# (batch id, shard, generation): an expansion shard's task, or its continuation.
ExpandShard = Callable[[str, int, int], None]
