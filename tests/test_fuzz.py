"""Schemathesis against the running API (real HTTP, tests/stack.py): every operation of the
OpenAPI schema gets a bounded number of generated requests, valid (positive) and invalid
(negative), authenticated with a tenant's key; every response must be no 5xx and conform to
the schema: status code, content type, documented headers, and the body (error bodies
included: problem+json).

Each operation that takes ids (in its path or its body) runs twice: with generated ids (they
answer 404) and with the ids of real objects of the tenant (a ready dataset and model, a queued
and a succeeded job with an artifact) and upload file names the routes accept, so the routes'
real work is fuzzed too.

The loop over operations is ours (``fuzz_operation``) rather than schemathesis' pytest plugin,
which does not run under pytest 9; the big run, with a table, is ``bench/fuzz.py``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

from stack import Stack, running
from test_api import blob_dir, ready_dataset, sql, upload_model

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
EXAMPLES = 10  # per operation, mode and id kind, in CI


@dataclass
class Outcome:
    """What fuzzing one operation in one mode did."""

    operation: str
    mode: str
    ids: str
    examples: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)  # one reproduction (curl) per distinct failure

    def record(self, failures: list[Failure], curl: str) -> None:
        for failure in failures:
            self.failures.setdefault(f"{failure.title}: {failure.message.splitlines()[0] if failure.message else ''}",
                                     curl)


def real_objects(stack: Stack, key: str) -> dict[str, Any]:
    """A ready dataset and model, a queued and a succeeded job, both with a metrics.json artifact."""
    with stack.client(key) as client:
        dataset = ready_dataset(stack, client)
        model = upload_model(client).json()["id"]
        sql(stack, "UPDATE models SET status='ready' WHERE id=%s", model)
        jobs = [client.post("/v1/jobs", json={"dataset_id": dataset, "seed": i}).json()["id"] for i in range(2)]
    sql(stack, "UPDATE jobs SET status='succeeded', finished_at=now() WHERE id=%s", jobs[1])
    payload = b'{"ok": true}'
    for job in jobs:
        blob = f"jobs/{job}/artifacts/metrics.json"
        path = blob_dir(stack, blob)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        sql(stack, "INSERT INTO artifacts (job_id, name, blob_key, size_bytes, sha256, content_type, created_at) "
                   "VALUES (%s, 'metrics.json', %s, %s, %s, 'application/json', now())", job, blob, len(payload),
            hashlib.sha256(payload).hexdigest())
    return {"dataset_id": dataset, "model_id": model, "job_id": jobs, "name": "metrics.json"}


def load_schema(base_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


def operations(schema: Any) -> list[Any]:
    """Every operation, the DELETEs last (so the real objects live while the others are fuzzed)."""
    return sorted((result.ok() for result in schema.get_all_operations()), key=lambda op: op.method.upper() == "DELETE")


def takes_ids(operation: Any) -> bool:
    """Whether real ids change what the operation does: ids in its path, or a body (ids, upload names)."""
    return bool(operation.path_parameters) or operation.method.upper() == "POST" and bool(operation.body)


UPLOAD_NAMES = {"/v1/models": "weights.safetensors", "/v1/datasets": "data.zip"}


def _use_real_ids(case: Any, real_ids: dict[str, Any], data: Any) -> None:
    """Put the tenant's real objects where the case has ids: path parameters and job bodies."""
    from hypothesis import strategies as st

    def pick(name: str) -> str:
        value = real_ids[name]
        return data.draw(st.sampled_from(value)) if isinstance(value, list) else value

    if case.path_parameters:
        case.path_parameters = {name: pick(name) if name in real_ids else value
                                for name, value in case.path_parameters.items()}
    if isinstance(case.body, dict):
        if "dataset_id" in case.body:
            case.body["dataset_id"] = pick("dataset_id")
        model = case.body.get("model")
        if isinstance(model, dict) and model.get("weights_id") is not None:
            model["weights_id"] = pick("model_id")


def fuzz_operation(operation: Any, base_url: str, key: str, *, mode: GenerationMode, examples: int,
                   real_ids: dict[str, Any] | None = None, derandomize: bool = True) -> Outcome:
    """Send ``examples`` generated requests to one operation and check every response.

    With ``real_ids``, the ids in the path and the job body are the tenant's real objects (one
    picked per case from a list) and uploaded files get a name the route accepts
    (weights.safetensors, data.zip). Failures are collected (one per distinct kind), not
    raised, so a run counts all it finds.
    """
    from hypothesis import strategies as st

    outcome = Outcome(operation.label, mode.value, "real" if real_ids else "generated")
    auth = {"Authorization": f"Bearer {key}"}
    session = requests.Session()
    upload_name = UPLOAD_NAMES.get(operation.path)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
              verbosity=Verbosity.quiet)
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: Any) -> None:
        if real_ids:
            _use_real_ids(case, real_ids, data)
        kwargs = case.as_transport_kwargs(base_url=base_url, headers=auth)
        if real_ids and upload_name and kwargs.get("files"):
            kwargs["files"] = [(name, (upload_name, *part[1:]) if name == "file" and isinstance(part, tuple) and part[0]
                                else part) for name, part in kwargs["files"]]
        outcome.examples += 1
        response = session.request(**kwargs, timeout=60)
        outcome.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=auth)
        except FailureGroup as group:
            outcome.record(list(group.exceptions), case.as_curl_command(headers=auth, base_url=base_url))
        except Failure as failure:
            outcome.record([failure], case.as_curl_command(headers=auth, base_url=base_url))

    try:
        run()
    except Unsatisfiable:
        pass  # nothing to make invalid (no parameters, no body): negative mode has no case
    finally:
        session.close()
    return outcome


# ---------------------------------------------------------------------------- the CI run

@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory):
    with running(tmp_path_factory.mktemp("api-fuzz"), MASKTUNE_MAX_UPLOAD_BYTES=str(1 << 20)) as s:
        yield s


@pytest.fixture(scope="module")
def fuzz_setup(fuzz_stack):
    key = fuzz_stack.create_key("fuzzer")
    return key, real_objects(fuzz_stack, key), load_schema(fuzz_stack.base_url)


def test_fuzz_every_operation(fuzz_stack, fuzz_setup):
    key, ids, schema = fuzz_setup
    ops = operations(schema)
    assert len(ops) >= 16
    outcomes = []
    for operation in ops:
        for mode in MODES:
            outcomes.append(fuzz_operation(operation, fuzz_stack.base_url, key, mode=mode, examples=EXAMPLES))
            if takes_ids(operation):
                outcomes.append(fuzz_operation(operation, fuzz_stack.base_url, key, mode=mode, examples=EXAMPLES,
                                               real_ids=ids))
    failed = {f"{o.operation} [{o.mode}, {o.ids} ids] {name}": curl for o in outcomes for name, curl in o.failures.items()}
    assert not failed, "\n\n".join(f"{name}\n  {curl[:1500]}" for name, curl in failed.items())
    assert sum(o.examples for o in outcomes) >= len(ops) * len(MODES)
    # The real ids reached the routes' real work: some answers were successes.
    assert any(code < 300 for o in outcomes if o.ids == "real" for code in o.statuses)
