"""The published contract: /api/openapi.json describes every route and nothing else, /api/docs serves Swagger UI
from local assets, and `flask openapi` prints the same document."""

import json
import re
import uuid

import pytest
from documentation import documentation_files
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource

from routes.docs import NOT_DESCRIBED, openapi_path

METHODS = {"get", "put", "post", "patch", "delete"}
PUBLIC = {("post", "/api/auth/login"), ("post", "/api/auth/register"), ("get", "/api/health"),
          ("get", "/api/health/ready"), ("get", "/api/openapi.json"),
          # a link's token is the credential (routes/accounts.py)
          ("post", "/api/auth/forgot-password"), ("post", "/api/auth/reset-password"),
          ("post", "/api/auth/confirm-email-change")}  # fmt: skip
# An invitation's and a verification's links carry their own token; asking for a new link needs none.
PUBLIC |= {("post", "/api/auth/accept-invitation"), ("post", "/api/auth/verify-email"),
           ("post", "/api/auth/resend-verification")}  # fmt: skip
NEVER_LIMITED = {"/api/health", "/api/health/ready", "/metrics"}  # polled by load balancers and Prometheus


def routes(app) -> set[tuple[str, str]]:
    return {
        (method.lower(), openapi_path(rule))
        for rule in app.url_map.iter_rules()
        if rule.endpoint not in NOT_DESCRIBED
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }


def described(document: dict) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in item if method in METHODS}


def operations(document: dict):
    for path, item in document["paths"].items():
        for method in METHODS & set(item):
            yield method, path, item[method]


@pytest.fixture
def document(client) -> dict:
    response = client.get("/api/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def test_the_document_is_public_valid_openapi(document):
    validate(document)  # raises on any violation of the OpenAPI 3.0 specification

    assert document["openapi"] == "3.0.3"
    assert document["servers"] == [{"url": "/"}]  # wherever it was fetched from, whatever the Host header said


def test_every_route_is_described_and_nothing_else(app, document):
    assert described(document) == routes(app)


def test_a_route_the_document_does_not_describe_is_noticed(app, client):
    app.add_url_rule("/api/undocumented", "undocumented", lambda: {"secret": True})

    document = client.get("/api/openapi.json").get_json()

    assert ("get", "/api/undocumented") in routes(app) - described(document)


def test_only_login_register_health_and_the_document_need_no_token(document):
    optional = {
        (method, path)
        for method, path, operation in operations(document)
        if operation.get("security") == [] or {} in operation.get("security", [])
    }

    # A refresh token in the body will do; metrics need METRICS_TOKEN when it is set.
    assert optional == PUBLIC | {("post", "/api/auth/refresh"), ("get", "/metrics")}
    assert document["security"] == [{"bearerAuth": []}]
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT", "description": "An access token."
    }  # fmt: skip
    assert document["paths"]["/api/auth/refresh"]["post"]["security"] == [{}, {"refreshToken": []}]
    assert document["paths"]["/metrics"]["get"]["security"] == [{"metricsToken": []}, {}]


def test_every_operation_documents_its_errors(document):
    for method, path, operation in operations(document):
        statuses = set(operation["responses"])
        assert {"200", "201", "202"} & statuses, (method, path)
        if (method, path) not in PUBLIC:
            assert "401" in statuses, (method, path)
        if "requestBody" in operation:
            assert {"400", "413"} <= statuses, (method, path)
        if method in {"post", "put", "patch"}:
            assert "400" in statuses, (method, path)  # a body that is not JSON
        if "{" in path:
            assert "404" in statuses, (method, path)
        if path not in NEVER_LIMITED:
            assert "429" in statuses, (method, path)
        if path not in {"/api/openapi.json", "/metrics"}:  # the only two that need no database
            assert "503" in statuses, (method, path)
        assert operation["summary"] and operation["operationId"], (method, path)
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids))


def test_errors_are_the_envelope_with_their_headers(document):
    responses = document["components"]["responses"]

    assert {name: response["content"]["application/json"]["schema"] for name, response in responses.items()} == {
        name: {"$ref": "#/components/schemas/Error"} for name in responses
    }
    assert document["components"]["schemas"]["Error"]["required"] == ["details", "error"]
    assert responses["TooManyRequests"]["headers"]["Retry-After"]["required"] is True
    assert "WWW-Authenticate" in responses["Unauthorized"]["headers"]


def test_request_schemas_come_from_the_validating_schemas(document):
    schemas = document["components"]["schemas"]

    assert schemas["Task"]["properties"]["status"]["enum"] == ["open", "closed"]
    assert schemas["Task"]["properties"]["entity_name"]["maxLength"] == 255
    assert schemas["Task"]["additionalProperties"] is False  # unknown fields are a 400
    assert "required" not in schemas["TaskUpdate"]  # PUT takes any subset
    assert schemas["BulkStatus"]["properties"]["task_ids"]["maxItems"] == 1000
    sort_by = next(p for p in document["paths"]["/api/tasks"]["get"]["parameters"] if p["name"] == "sort_by")
    assert sort_by["schema"]["enum"] == [
        "date_created",
        "task_time",
        "entity_name",
        "task_type",
        "status",
        "updated_at",
    ]


CURL_WITH_BODY = re.compile(
    r"curl -s -X (POST|PUT|PATCH) \"?http://127\.0\.0\.1:5000(/[^\s\"]+).*"
    r" -d (?:'([^']*)'|\"((?:[^\"\\]|\\.)*)\")"  # the body in single quotes, or in double quotes with \" inside
)


def documented_text() -> str:
    """README.md and docs/*.md, one after the other."""
    return "\n".join(path.read_text() for path in documentation_files())


def documented_requests() -> list[tuple[str, str, dict]]:
    """The documentation's curl calls that send a JSON body and expect success: (method, path, body)."""
    text = documented_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        command = re.search(CURL_WITH_BODY, line)
        if not command or re.search(r"#\s*4\d\d", line):
            continue
        method, path, single_quoted, double_quoted = command.groups()
        body = single_quoted if single_quoted is not None else double_quoted.replace('\\"', '"')
        body = re.sub(r"\$[A-Z]+", str(uuid.uuid4()), body)
        path = re.sub(r"\$[A-Z]+", str(uuid.uuid4()), path)
        found.append((method.lower(), path, json.loads(body)))
    return found


def template_for(document: dict, path: str) -> str:
    for template in document["paths"]:
        if re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", template), path) and not (
            template.endswith("{task_id}") and path.endswith("bulk-status")
        ):
            return template
    raise AssertionError(f"{path} is not in the document")


def test_the_documented_examples_are_valid_requests_by_the_document(document):
    registry = Registry().with_resource("urn:api", Resource.opaque(document))
    requests = documented_requests()

    assert len(requests) >= 10
    for method, path, body in requests:
        schema = document["paths"][template_for(document, path)][method]["requestBody"]["content"]["application/json"]
        validator = OAS30Validator({"$ref": "urn:api" + schema["schema"]["$ref"]}, registry=registry)
        assert not list(validator.iter_errors(body)), (method, path, body)


def test_the_examples_in_the_document_are_the_documentation_s(document):
    schemas = document["components"]["schemas"]

    assert schemas["Task"]["properties"]["entity_name"]["example"] == "ABC Corporation"
    assert schemas["Login"]["properties"]["username"]["example"] == "admin"
    documentation = documented_text()
    for schema in schemas.values():
        for field in schema.get("properties", {}).values():
            if isinstance(field.get("example"), str) and field["example"]:
                assert field["example"] in documentation, field


def test_docs_page_is_swagger_ui_from_local_assets(client):
    assert client.get("/api/docs").status_code == 308

    page = client.get("/api/docs/")

    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert '"url": "/api/openapi.json"' in html
    assert '"validatorUrl": null' in html  # no call to swagger.io's validator
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) >= 4
    for asset in assets:
        assert asset.startswith("/api/docs/"), asset
        assert client.get(asset).status_code == 200, asset
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "http" not in csp


def test_the_api_itself_still_allows_no_scripts(client):
    assert client.get("/api/openapi.json").headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_flask_openapi_prints_the_served_document(runner, document):
    result = runner.invoke(args=["openapi", "--server", "https://tasks.example.com/"])

    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["servers"] == [{"url": "https://tasks.example.com"}]
    assert {**printed, "servers": document["servers"]} == document
