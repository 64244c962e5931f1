"""The one error envelope, for every kind of bad request and for failures of our own."""

import io
import json
import logging
import uuid

import pytest
from sqlalchemy import text

from helpers import assert_error
from models import db

VALID_TASK = {"entity_name": "ABC", "task_type": "Call", "task_time": "2025-01-01T10:00:00Z"}


def test_unknown_route_is_json_404(client, auth_headers):
    assert_error(client.get("/api/nothing-here"), 404)
    assert_error(client.get("/"), 404)
    assert_error(client.get("/api//tasks", headers=auth_headers), 404)  # not an HTML redirect


def test_wrong_method_is_json_405_with_allow_header(client):
    response = client.delete("/api/auth/login")

    assert_error(response, 405)
    assert "POST" in response.headers["Allow"]


def test_body_over_1_mb_is_413(client, auth_headers):
    body = b'{"note": "' + b"x" * (1024 * 1024) + b'"}'

    response = client.post("/api/tasks", data=body, content_type="application/json", headers=auth_headers)

    assert_error(response, 413)


def post_streamed(client, headers: dict, body: bytes):
    """A POST with a chunked body, as gunicorn hands it over: no Content-Length, input marked as terminated."""
    return client.post(
        "/api/tasks",
        input_stream=io.BytesIO(body),
        content_type="application/json",
        headers=headers | {"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )


def task_json(assignee_id: str) -> bytes:
    task = {"entity_name": "X", "task_type": "Call", "task_time": "2025-01-01", "contact_person_id": assignee_id}
    return json.dumps(task).encode()


def test_streamed_body_of_exactly_1_mb_is_read(client, auth_headers, other_user):
    task = task_json(other_user["id"])

    response = post_streamed(client, auth_headers, task + b" " * (1024 * 1024 - len(task)))

    assert response.status_code == 201, response.get_json()


@pytest.mark.parametrize("padding", [1024 * 1024, 2 * 1024 * 1024])
def test_streamed_body_over_1_mb_is_413_not_cut_short(client, auth_headers, other_user, padding):
    # Valid JSON within the first megabyte, so a body cut at the limit would be accepted.
    assert_error(post_streamed(client, auth_headers, task_json(other_user["id"]) + b" " * padding), 413)


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


def test_huge_id_list_gets_one_short_error(client, auth_headers):
    body = {"task_ids": [0] * 200_000, "status": "closed"}

    response = client.patch("/api/tasks/bulk-status", json=body, headers=auth_headers)

    assert_error(response, 400, "task_ids")
    assert response.get_json()["details"] == {"task_ids": ["Length must be between 1 and 1000."]}


def test_many_unknown_fields_name_a_few_in_the_sentence(client):
    body = {f"field{n}": n for n in range(50)} | {"username": "alice", "password": "secret-enough"}

    error = assert_error(client.post("/api/auth/login", json=body), 400)

    assert len(error["details"]) == 50
    assert "45 more in details" in error["error"] and len(error["error"]) < 300


@pytest.mark.parametrize(
    ("damage", "status", "logged"),
    [
        ("ALTER TABLE tasks DROP COLUMN note", 500, "Unhandled error"),  # a bug: logged with its traceback
        ("DROP TABLE tasks", 503, "flask db upgrade"),  # never migrated: the log says what to run
    ],
)
def test_database_errors_that_are_not_an_outage(app, client, auth_headers, caplog, damage, status, logged):
    with app.app_context():
        db.session.execute(text(damage))
        db.session.commit()

    with caplog.at_level(logging.ERROR):
        response = client.get("/api/tasks", headers=auth_headers)

    assert_error(response, status)
    record = next(record for record in caplog.records if logged in record.getMessage())
    assert (record.exc_info is not None) == (status == 500)


def test_an_unknown_field_name_comes_back_as_valid_unicode(client):
    response = client.post(
        "/api/auth/login",
        data='{"\\udfff\\ud800x": 1, "username": "a", "password": "b"}',
        content_type="application/json",
    )

    body = assert_error(response, 400)
    assert list(body["details"]) == ["\ufffd\ufffdx"]
    response.get_data().decode("utf-8")  # and the whole body is valid UTF-8 JSON


def test_deleting_twice_is_404_the_second_time(client, auth_headers, make_task):
    task = make_task()

    assert client.delete(f"/api/tasks/{task['id']}", headers=auth_headers).status_code == 200
    assert_error(client.delete(f"/api/tasks/{task['id']}", headers=auth_headers), 404)
    assert_error(client.delete(f"/api/tasks/{uuid.uuid4()}", headers=auth_headers), 404)
