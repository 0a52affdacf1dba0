"""schemathesis fuzzes every operation in the server's own OpenAPI schema: no input may cause a 5xx.

In-process against a scripted backend (fast, many examples); the live server with the real engine gets a
bounded run in tests/test_server_live.py.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from glmlocal.server.app import ServerConfig, create_app
from tests.server_fakes import FakeBackend

schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(FakeBackend(), ServerConfig(model_id="glm-4.6")))


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
