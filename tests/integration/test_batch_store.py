"""BatchStore transitions that the end-to-end batch tests do not reach on their own."""

from shared.batches import Batch, BatchStatus, BatchStore


def _batch(store: BatchStore, status: BatchStatus) -> Batch:
    return store.create(Batch(id=f"b-{status.value}", status=status, options={}, source={}))


def test_a_batch_whose_manifest_cannot_be_written_ends_failed(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    _batch(store, BatchStatus.RUNNING)
    assert store.fail("b-running", code="storage_unavailable", message="S3 down") == "failed"
    failed = store.get("b-running")
    assert failed.error == {"code": "storage_unavailable", "message": "S3 down"}
    assert failed.finished_at


def test_fail_leaves_a_finished_batch_alone(redis_client):
    store = BatchStore(redis_client, ttl_s=60)
    _batch(store, BatchStatus.CANCELED)
    assert store.fail("b-canceled", code="x", message="y") == "canceled"
    assert store.get("b-canceled").error is None
