"""The one error envelope, for every kind of bad request and for failures of our own."""

import logging

import pytest

from helpers import assert_error

VALID_TASK = {"entity_name": "ABC", "task_type": "Call", "task_time": "2025-01-01T10:00:00Z"}


def test_unknown_route_is_json_404(client):
    assert_error(client.get("/api/nothing-here"), 404)
    assert_error(client.get("/"), 404)


def test_wrong_method_is_json_405_with_allow_header(client):
    response = client.delete("/api/auth/login")

    assert_error(response, 405)
    assert "POST" in response.headers["Allow"]


def test_body_over_1_mb_is_413(client, auth_headers):
    body = b'{"note": "' + b"x" * (1024 * 1024) + b'"}'

    response = client.post("/api/tasks", data=body, content_type="application/json", headers=auth_headers)

    assert_error(response, 413)


def test_body_just_under_1_mb_is_read(client, auth_headers):
    body = b'{"note": "' + b"x" * (1024 * 1024 - 100) + b'"}'

    response = client.post("/api/tasks", data=body, content_type="application/json", headers=auth_headers)

    assert_error(response, 400, "note")  # validated, not refused for size


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        ('{"username": "alice",', "application/json"),
        ("", "application/json"),
        ("[]", "application/json"),
        ('["alice", "secret"]', "application/json"),
        ('"alice"', "application/json"),
        ("null", "application/json"),
        ("42", "application/json"),
        ("[" * 100_000, "application/json"),
        (b'{"username": "\xff"}', "application/json"),
        ('{"username": "alice", "password": "x"}', "text/plain"),
        ("username=alice&password=secret", "application/x-www-form-urlencoded"),
        ('{"username": "alice", "password": "x"}', None),
    ],
    ids=[
        "truncated", "empty", "empty array", "array", "string", "null", "number", "deep nesting", "bad utf-8",
        "text/plain", "form", "no content type",
    ],
)  # fmt: skip
def test_body_that_is_not_a_json_object_is_400(client, data, content_type):
    assert_error(client.post("/api/auth/login", data=data, content_type=content_type), 400)


def test_validation_error_names_every_bad_field(client, auth_headers):
    response = client.post(
        "/api/tasks", json={"task_type": "", "task_time": "soon", "status": "x"}, headers=auth_headers
    )

    body = assert_error(response, 400, "entity_name", "task_type", "task_time", "status", "contact_person_id")
    assert all(isinstance(messages, list) and messages for messages in body["details"].values())


@pytest.fixture
def failing_app(app):
    @app.get("/api/explode")
    def explode():
        raise RuntimeError("secret internals: password=hunter2")

    return app


def test_unexpected_error_is_500_without_internals_and_is_logged_with_request_id(failing_app, caplog):
    with caplog.at_level(logging.ERROR):
        response = failing_app.test_client().get("/api/explode", headers={"X-Request-ID": "req-123"})

    body = assert_error(response, 500)
    text = response.get_data(as_text=True)
    assert "hunter2" not in text and "Traceback" not in text and "RuntimeError" not in text
    assert body["details"] == {"request_id": "req-123"}
    assert response.headers["X-Request-ID"] == "req-123"
    record = next(r for r in caplog.records if "Unhandled error" in r.getMessage())
    assert "req-123" in record.getMessage() and "/api/explode" in record.getMessage()
    assert record.exc_info is not None  # the traceback goes to the server log


def test_request_id_is_generated_when_missing_or_unsafe(client):
    generated = client.get("/api/health").headers["X-Request-ID"]
    replaced = client.get("/api/health", headers={"X-Request-ID": "bad id <script>"}).headers["X-Request-ID"]

    assert len(generated) == 32
    assert replaced != "bad id <script>" and len(replaced) == 32
