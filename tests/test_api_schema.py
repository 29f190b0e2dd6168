"""Property-based checks of the web API against its own OpenAPI schema (schemathesis): for requests
generated from the schema, valid and invalid, no endpoint answers 5xx, every status code and body is
the documented one, and answers to invalid input are 4xx.

Not checked: that every schema-valid job is accepted (a model's size multiple, its timesteps and the
server's limits are per model, beyond what a JSON schema says; those refusals are 422s naming the field),
and Starlette's Allow header on 405 (it lists the methods of one route object per path).
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, settings  # noqa: E402

from latentdiff.server import Limits, create_app, load_models  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from latentdiff.training.config import load_config
    from latentdiff.training import make_trainer

    runs = tmp_path_factory.mktemp("runs")
    make_trainer(load_config("digits-tiny", ["train.steps=2", "train.grid_samples=2", "train.grid_steps=2",
                                             "data.limit=16", "train.warmup_steps=1", "train.threads=1"]),
                 runs / "tiny", progress=False).run()
    return create_app(load_models([runs / "tiny"]), Limits(max_steps=8, max_size=32, max_batch=2, queue=2,
                                                           preview_every=1), tmp_path_factory.mktemp("out"), [runs])


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_endpoint_answers_as_documented(case):
    case.call_and_validate(excluded_checks=[schemathesis.checks.allow_header_conformance,
                                            schemathesis.checks.positive_data_acceptance])
