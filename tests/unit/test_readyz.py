"""/readyz with no worker alive: not ready by default; ready where workers scale to zero
(FEATUREMAPS_READYZ_REQUIRES_WORKER=false, as deploy/k8s/ sets it), still reporting them."""

import pytest

from api import create_app
from api.services import Services
from shared.settings import Settings


class _Redis:
    def ping(self) -> bool:
        return True

    def scan_iter(self, **_kwargs) -> list:
        return []  # no worker heartbeats


class _Store:
    def ping(self) -> None:
        pass

    def ensure_bucket(self) -> None:
        pass


@pytest.mark.parametrize(("requires_worker", "status"), [(True, 503), (False, 200)])
def test_readyz_without_workers(requires_worker: bool, status: int) -> None:
    settings = Settings(readyz_requires_worker=requires_worker)
    services = Services(settings, _Redis(), jobs=None, batches=None, store=_Store(), producer=None)
    response = create_app(settings, services).test_client().get("/readyz")
    assert response.status_code == status
    assert response.json["checks"]["workers"] == {"ok": False, "count": 0, "hostnames": []}
