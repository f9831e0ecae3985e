"""Schemathesis against the running API's own OpenAPI document: every operation, with a valid
bearer token. No 5xx, and every response (status, headers, body) conforms to the document.

The schema is built from :func:`api.openapi.openapi_document` at collection time (the
deployment only exists once fixtures run), and a test checks that /openapi.json serves
exactly that document."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from api.openapi import openapi_document
from tests.integration.deployment import Deployment

TOKEN = "schema-token"
MAX_EXAMPLES = 100

# A schema cannot say "a decodable image" or "an archive": schema-valid bytes may still be
# refused for their content (413, 415, 422), never for a field or option (400). Nor can it
# say which s3:// sources the operator allows (403 forbidden_source, docs/security.md).
REFUSALS = ["403", "413", "415", "422"]
config = schemathesis.Config.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "3xx", "401", "404", "409", "429", *REFUSALS]
            }
        }
    }
)
schema = schemathesis.openapi.from_dict(openapi_document(), config=config)


@schema.hook
def map_case(context, case):
    """No callback_url in a schema-valid case: a schema cannot say which hosts resolve to
    public addresses, so such a case is refused (400 callback_url_refused);
    tests/integration/test_webhooks.py covers the field. Without it, item_callbacks=true is
    a 400 too (tests/integration/test_item_callbacks.py). Nor can it say which names a
    model's layers have (400 for a ``layers`` pattern matching none;
    tests/integration/test_models_api.py). Invalid cases keep theirs."""
    positive = case.meta is None or case.meta.generation.mode == GenerationMode.POSITIVE
    if positive and isinstance(case.body, dict):
        case.body.pop("callback_url", None)
        case.body.pop("item_callbacks", None)
        case.body.pop("layers", None)
    return case


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    # A worker too, so that /readyz is ready.
    with Deployment.started(
        tmp_path_factory.mktemp("schema"),
        redis_server,
        s3_server,
        name="schema",
        db=7,
        api_tokens=TOKEN,
        max_upload_mb=1,
    ) as dep:
        yield dep


def test_the_served_document_is_the_one_tested(deployment):
    served = requests.get(f"{deployment.api}/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == openapi_document()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_conforms_to_the_openapi_document(case, deployment):
    case.call_and_validate(base_url=deployment.api, headers={"Authorization": f"Bearer {TOKEN}"})
