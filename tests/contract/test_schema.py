"""The OpenAPI document holds every operation to the contract, without a server: a later endpoint
that forgets its error answers or answers a bare list fails here, before schemathesis runs."""

from __future__ import annotations

import pytest
from drf_spectacular.generators import SchemaGenerator

from tests.conftest import api_client_for

ERROR_REF = "#/components/schemas/ErrorResponse"


@pytest.fixture(scope="module")
def schema() -> dict:
    return SchemaGenerator().get_schema(request=None, public=True)


def operations(schema):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", path, method, operation


def resolve(schema, node):
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]]
    return node


def has_binary(schema, node) -> bool:
    node = resolve(schema, node)
    if node.get("format") == "binary":
        return True
    children = [*node.get("properties", {}).values(), *([node["items"]] if "items" in node else [])]
    return any(has_binary(schema, child) for child in children)


def test_the_document_is_the_api_v1_contract_and_nothing_else(schema):
    assert schema["paths"], "no operations at all"
    assert all(path.startswith("/api/v1/") for path in schema["paths"])
    body = resolve(schema, {"$ref": ERROR_REF})
    assert body["required"] == ["error"]
    assert set(resolve(schema, body["properties"]["error"])["required"]) == {"code", "message", "detail"}


def test_endpoints_of_other_protocols_stay_out_of_the_document():
    from config.openapi import only_api_v1

    endpoints = [("/v2/models/demo/infer", "", "POST", None), ("/dicomweb/studies", "", "POST", None)]
    endpoints.append(("/api/v1/images/", "", "GET", None))
    assert only_api_v1(endpoints) == [("/api/v1/images/", "", "GET", None)]


def test_every_error_answer_has_the_one_error_shape(schema):
    for name, _, _, operation in operations(schema):
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")):
                content = response.get("content", {})
                assert list(content) == ["application/json"], f"{name} {status}: {list(content)}"
                assert content["application/json"]["schema"] == {"$ref": ERROR_REF}, f"{name} {status}"


def test_every_operation_documents_the_statuses_it_can_answer(schema):
    for name, path, _, operation in operations(schema):
        statuses = set(operation["responses"])
        if {} not in operation.get("security", [{}]):
            assert {"401", "403"} <= statuses, f"{name} needs a user but documents {sorted(statuses)}"
        if "{" in path:
            assert "404" in statuses, f"{name} names an object but documents {sorted(statuses)}"
        body = operation.get("requestBody")
        if body:
            assert {"400", "413", "415"} <= statuses, f"{name} takes a body but documents {sorted(statuses)}"
            if any(has_binary(schema, media["schema"]) for media in body["content"].values()):
                assert {"413", "415", "422"} <= statuses, f"{name} takes a file but documents {sorted(statuses)}"
        if any(parameter["in"] == "query" for parameter in operation.get("parameters", [])):
            assert "400" in statuses, f"{name} takes query parameters but documents {sorted(statuses)}"


def test_every_list_answers_a_page_envelope(schema):
    lists = []
    for name, _, _, operation in operations(schema):
        for status, response in operation["responses"].items():
            if not status.startswith("2"):
                continue
            for media_type, media in response.get("content", {}).items():
                if media_type != "application/json" or "schema" not in media:
                    continue
                body = resolve(schema, media["schema"])
                assert body.get("type") != "array", f"{name} {status} answers a bare list: give it a pagination_class"
                properties = body.get("properties", {})
                if {"next", "next_cursor"} & set(properties):
                    lists.append(name)
                    assert resolve(schema, properties["results"]).get("type") == "array", name
                    assert "results" in body["required"], name
    assert {"GET /api/v1/images/", "GET /api/v1/studies/", "GET /api/v1/batches/", "GET /api/v1/members/"} <= set(lists)


def test_signing_in_documents_the_token_pair_it_answers(schema):
    answer = schema["paths"]["/api/v1/auth/token/"]["post"]["responses"]["200"]  # was "No response body"
    pair = resolve(schema, answer["content"]["application/json"]["schema"])
    assert set(pair["required"]) == {"access", "refresh"}


def test_uploads_are_multipart_with_the_real_field_names(schema):
    upload = schema["paths"]["/api/v1/images/"]["post"]["requestBody"]["content"]
    assert list(upload) == ["multipart/form-data"]
    assert {"file", "patient_id", "study_date"} <= set(
        resolve(schema, upload["multipart/form-data"]["schema"])["properties"]
    )
    items = schema["paths"]["/api/v1/batches/{job_id}/items/"]["post"]["requestBody"]["content"]
    assert set(resolve(schema, items["multipart/form-data"]["schema"])["properties"]) == {
        "files",
        "archive",
        "prefix",
        "screen",
    }


# What the document says is what the server enforces: these were accepted although documented as invalid.


def test_an_unrouted_api_path_answers_the_error_shape(clinician_a):
    response = api_client_for(clinician_a).get("/api/v1/batches/null/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/v1/images/?page_size=0", "page_size"),
        ("/api/v1/images/?page_size=abc", "page_size"),
        ("/api/v1/images/?page_size=201", "page_size"),
        ("/api/v1/studies/?sort=", "sort"),
        ("/api/v1/studies/?date_from=", "date_from"),
    ],
)
def test_a_documented_bound_is_an_enforced_one(clinician_a, url, field):
    response = api_client_for(clinician_a).get(url)
    assert response.status_code == 400, response.content
    assert field in str(response.json()["error"])


def test_a_forged_cursor_is_refused_in_words(clinician_a):
    from base64 import b64encode

    forged = b64encode(b"p=not-a-time").decode()
    response = api_client_for(clinician_a).get("/api/v1/images/", {"cursor": forged})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_cursor"


def test_an_empty_cursor_is_the_first_page(clinician_a):
    response = api_client_for(clinician_a).get("/api/v1/images/", {"cursor": ""})  # was a 400
    assert response.status_code == 200 and response.json()["results"] == []


def test_an_empty_prefix_is_not_an_omitted_one(clinician_a, demo_model):
    from django.core.files.uploadedfile import SimpleUploadedFile

    client = api_client_for(clinician_a)
    job = client.post("/api/v1/batches/", {"name": "night"}, format="json").json()
    archive = SimpleUploadedFile("a.zip", b"PK\x05\x06" + b"\x00" * 18)
    response = client.post(f"/api/v1/batches/{job['id']}/items/", {"archive": archive, "prefix": ""})
    assert response.status_code == 400
    assert "prefix" in response.json()["error"]["detail"]


def test_results_come_in_the_format_asked_for_and_no_other(clinician_a, demo_model):
    client = api_client_for(clinician_a)
    job = client.post("/api/v1/batches/", {"name": "night"}, format="json").json()
    url = f"/api/v1/batches/{job['id']}/results/"
    as_csv = client.get(url, {"format": "csv"})  # was 404: DRF took `format` for its renderer switch
    assert as_csv.status_code == 200 and as_csv["Content-Type"].startswith("text/csv")
    assert client.get(url, {"format": "json"})["Content-Type"].startswith("application/json")
    refused = client.get(url, {"format": "xml"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "bad_format"


def test_a_job_for_a_model_that_does_not_exist_is_not_found(clinician_a, demo_model):
    response = api_client_for(clinician_a).post("/api/v1/batches/", {"name": "n", "model": "nope"}, format="json")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_model"


@pytest.mark.parametrize(
    ("body", "field"),
    [({"name": 0}, "name"), ({"name": "n", "alias": 1}, "alias"), ({"name": ["n"]}, "name")],
)
def test_a_json_value_of_the_wrong_type_is_refused_not_coerced(clinician_a, demo_model, body, field):
    response = api_client_for(clinician_a).post("/api/v1/batches/", body, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["detail"]


def test_a_json_page_size_must_be_a_number(clinician_a):
    response = api_client_for(clinician_a).post("/api/v1/studies/search/", {"q": "P1", "page_size": "5"}, format="json")
    assert response.status_code == 400
    assert "page_size" in response.json()["error"]["detail"]


def test_a_length_limit_counts_the_value_as_sent(clinician_a, demo_model):
    # DRF trimmed first: one space and 200 characters passed a limit of 200
    response = api_client_for(clinician_a).post("/api/v1/batches/", {"name": " " + "n" * 200}, format="json")
    assert response.status_code == 400
    assert "name" in response.json()["error"]["detail"]


def test_the_documented_string_patterns_are_what_drf_refuses():
    import re

    from rest_framework import serializers

    from config.openapi import NON_BLANK_PATTERN, TEXT_PATTERN

    field = serializers.CharField()
    for code in range(0x3001):  # every whitespace str.strip() removes is below U+3001
        value = chr(code) * 2
        try:
            field.run_validation(value)
            accepted = True
        except serializers.ValidationError:
            accepted = False
        assert accepted == bool(re.search(NON_BLANK_PATTERN, value)), hex(code)  # was \s: engines disagree
    assert not re.search(TEXT_PATTERN, "a\x00b") and re.search(TEXT_PATTERN, "")
