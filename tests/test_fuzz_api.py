"""The HTTP API fuzzed by Schemathesis from its own /openapi.json: the real launcher with --nowebui (the /sdapi/v1
routes only, the extensions' among them), on the CPU over its demo model. Every operation gets data its schema allows
and, where the schema rules anything out, data it does not: no request gets a 5xx, every answer is one the schema
documents, and the server still answers after.

The limits are set tight before every request (a fuzzed POST /options may have raised them), so that a generation a
request starts is a small one."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, CheckFunction, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.errors import FailureGroup

from tests.live import Server, serving

LIMITS = {"max_image_side": 128, "max_steps": 4, "max_batch_size": 1, "max_batch_count": 1, "max_prompt_length": 300,
          "max_plot_cells": 4}
EXAMPLES = 100  # per operation, both kinds of data together; one without parameters or a body makes one request
# positive_data_acceptance is not among them: the bodies are declared as any JSON, most of which is rightly a 422.
SCHEMA_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance,
                 negative_data_rejection]


@pytest.fixture(scope="module", autouse=True)
def hypothesis_storage(tmp_path_factory) -> Iterator[None]:
    """Hypothesis' caches go to a temporary folder, not .hypothesis in the repository (its database is off)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYPOTHESIS_STORAGE_DIRECTORY", str(tmp_path_factory.mktemp("hypothesis")))
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("fuzz"), "--nowebui") as live:
        yield live


def within_limits(spec: dict) -> dict:
    """The server's schema, with the limits the test sets as the txt2img fields' maximums (and the field whose
    default passes them required): data the schema allows then mostly makes an image, instead of mostly asking for a
    size beyond the limit."""
    fields = spec["paths"]["/sdapi/v1/txt2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for name, limit in {"width": "max_image_side", "height": "max_image_side", "steps": "max_steps",
                        "batch_size": "max_batch_size", "n_iter": "max_batch_count"}.items():
        fields["properties"][name]["maximum"] = LIMITS[limit]
    fields["required"] = ["steps"]  # its default (20) is beyond the limit; a missing size is the demo's 128x128
    return spec


def fuzz(server: Server, checks: list[CheckFunction]) -> list[str]:
    """Every operation in turn, with data of both kinds (only the allowed kind where the schema allows anything);
    Schemathesis' report of what failed, by operation, each with a curl command that makes the request again."""
    schema = schemathesis.openapi.from_dict(within_limits(requests.get(f"{server.url}/openapi.json", timeout=30).json()))
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            fuzz_operation(server, operation, checks)
        except (Exception, FailureGroup) as e:  # the other operations are fuzzed all the same
            failures.append(f"{operation.label}: {e}")
    return failures


def fuzz_operation(server: Server, operation: APIOperation, checks: list[CheckFunction]) -> None:
    @given(case=st.one_of([operation.as_strategy(mode) for mode in GenerationMode]))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, report_multiple_bugs=False)
    def call(case: Case) -> None:
        assert server.api("POST", "options", json=LIMITS | {"CLIP_stop_at_last_layers": 1}).status_code == 200
        case.call_and_validate(base_url=server.url, checks=checks, timeout=60)

    call()


def test_no_request_gets_a_server_error(server):
    failures = fuzz(server, [not_a_server_error])
    assert not failures, "\n\n".join(failures)


def test_every_answer_is_one_the_schema_documents(server):
    failures = fuzz(server, SCHEMA_CHECKS)
    assert not failures, "\n\n".join(failures)


def test_the_server_still_answers_after_the_fuzzing(server):
    assert server.process.poll() is None, f"the server exited:\n{server.log}"
    assert server.api("GET", "progress").status_code == 200
