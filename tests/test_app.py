"""The app's wiring: CORS, the token guard on every blueprint, and how the database is used."""

import json
import re
import uuid
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from flask import request
from flask.json.provider import DefaultJSONProvider
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from app import create_app
from commands import prepare_database
from helpers import assert_error, settings
from models import Task, db


def test_importing_app_module_builds_nothing():
    import app as app_module

    assert "app" not in vars(app_module)


def preflight(client, origin: str, path: str = "/api/tasks", method: str = "POST"):
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "Authorization, Content-Type, X-Request-ID",
        },
    )


@pytest.mark.parametrize("origin", ["http://localhost:4200", "http://127.0.0.1:4200"])
def test_preflight_from_an_allowed_origin_is_granted(client, origin):
    response = preflight(client, origin)

    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == origin
    allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-request-id"} <= allowed
    assert "POST" in response.headers["Access-Control-Allow-Methods"]


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "http://localhost:4201", "http://localhost:4200.evil.example", "null"]
)
def test_other_origins_get_no_cors_grant(client, origin):
    response = preflight(client, origin)

    assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_headers_are_on_error_responses_too(client):
    response = client.get("/api/tasks", headers={"Origin": "http://localhost:4200"})

    assert_error(response, 401)
    assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:4200"


def test_cors_origins_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CORS_ORIGIN", "https://app.finstack.com,https://staging.finstack.com")
    app = create_app(settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path))

    assert preflight(app.test_client(), "https://app.finstack.com").headers["Access-Control-Allow-Origin"] == (
        "https://app.finstack.com"
    )
    assert "Access-Control-Allow-Origin" not in preflight(app.test_client(), "http://localhost:4200").headers


def test_foreign_keys_are_enforced(app, user):
    with app.app_context():
        db.session.add(
            Task(
                entity_name="Orphan",
                task_type="Call",
                task_time=datetime.now(UTC),
                contact_person_id=uuid.uuid4(),
            )
        )
        with pytest.raises(IntegrityError):
            db.session.commit()
        db.session.rollback()


def test_database_stores_utc_whatever_offset_it_was_given(app, user):
    stored_as_utc = {
        "sqlite": "SELECT task_time FROM tasks",  # SQLite keeps the text it is given
        "postgresql": "SELECT to_char(task_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') FROM tasks",
    }
    with app.app_context():
        moment = datetime(2024, 12, 25, 12, 0, tzinfo=timezone(timedelta(hours=2)))
        task = Task(entity_name="TZ", task_type="Call", task_time=moment, contact_person_id=uuid.UUID(user["id"]))
        db.session.add(task)
        db.session.commit()
        raw = db.session.execute(text(stored_as_utc[db.engine.dialect.name])).scalar_one()
    assert raw.startswith("2024-12-25 10:00:00")


def test_everything_but_login_register_health_and_docs_needs_a_token(app, client):
    public = {"/api/auth/login", "/api/auth/register", "/api/health", "/api/health/ready", "/api/openapi.json",
              "/api/docs/"}  # fmt: skip
    public_files = {"/api/docs/<path:path>"}  # the docs page's scripts and styles
    public |= {"/api/auth/accept-invitation", "/api/auth/verify-email", "/api/auth/resend-verification"}  # by email
    public |= {"/api/auth/forgot-password", "/api/auth/reset-password", "/api/auth/confirm-email-change"}
    public |= {"/metrics"}  # for Prometheus, which holds no user token: METRICS_TOKEN guards it (test_metrics.py)
    rules = list(app.url_map.iter_rules())

    for rule in rules:
        path = re.sub(r"<uuid:\w+>", str(uuid.uuid4()), rule.rule).replace("<path:path>", "swagger-ui.css")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            response = client.open(path, method=method, json={})
            if rule.rule in public | public_files:
                assert response.status_code != 401, (method, path)
            else:
                assert_error(response, 401)
    assert {rule.rule for rule in rules} >= public | public_files


def test_requests_without_origin_get_no_cors_headers(client):
    assert not [name for name in client.get("/api/health").headers.keys() if name.startswith("Access-Control")]


def test_extreme_timestamps_survive_a_server_whose_time_zone_is_not_utc(fresh_database_url, tmp_path):
    if fresh_database_url.startswith("postgresql"):
        server = sa.create_engine(fresh_database_url, isolation_level="AUTOCOMMIT")
        with server.connect() as connection:
            name = sa.make_url(fresh_database_url).database
            connection.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET timezone = 'Pacific/Kiritimati'")
        server.dispose()
    app = create_app(settings(fresh_database_url, tmp_path, AUTO_MIGRATE=True, ADMIN_PASSWORD="admin-pass-1"))
    prepare_database(app)
    client = app.test_client()
    login = client.post("/api/auth/login", json={"username": "admin", "password": "admin-pass-1"}).get_json()
    headers = {"Authorization": f"Bearer {login['access_token']}"}

    for moment in ("9999-12-31T23:59:59.999999+00:00", "0001-01-01T00:00:00+00:00"):
        task = {"entity_name": "Edge", "task_type": "Call", "task_time": moment}
        task["contact_person_id"] = login["user"]["id"]
        created = client.post("/api/tasks", json=task, headers=headers)
        assert created.status_code == 201, created.get_json()
        fetched = client.get(f"/api/tasks/{created.get_json()['task']['id']}", headers=headers)
        assert fetched.status_code == 200 and fetched.get_json()["task"]["task_time"] == moment
    assert client.get("/api/tasks?sort_by=task_time", headers=headers).status_code == 200


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/health", 200),
        ("GET", "/api/tasks", 401),
        ("GET", "/api/nowhere", 404),
        ("POST", "/api/auth/login", 400),
        ("DELETE", "/api/health", 405),
    ],
)
def test_every_response_carries_the_security_headers(client, method, path, status):
    response = client.open(path, method=method, json={} if method == "POST" else None)

    assert response.status_code == status
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name


def test_a_rate_limited_response_carries_them_too(client):
    for _ in range(10):
        client.post("/api/auth/login", json={})
    response = client.post("/api/auth/login", json={})

    assert_error(response, 429)
    assert response.headers["X-Frame-Options"] == "DENY"


def test_auth_and_user_responses_are_never_cached(client, user, auth_headers):
    login = client.post("/api/auth/login", json={"username": "alice", "password": user["password"]})
    failed = client.post("/api/auth/login", json={"username": "alice", "password": "wrong-password"})

    for response in (login, failed, client.get("/api/users", headers=auth_headers)):
        assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.app_config(TRUSTED_PROXY_COUNT=1)
def test_behind_a_trusted_proxy_its_scheme_is_honoured(app, client):
    seen = {}

    @app.get("/api/probe-address")
    def probe():
        seen.update(address=request.remote_addr, secure=request.is_secure)
        return {}

    forwarded = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9", "X-Forwarded-Proto": "https"}
    response = client.get("/api/probe-address", headers=forwarded)

    assert seen == {"address": "203.0.113.9", "secure": True}
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")  # HSTS only over HTTPS
    assert "Strict-Transport-Security" not in client.get("/api/probe-address").headers


@pytest.mark.parametrize(
    "content_type", ["multipart/form-data", "application/x-www-form-urlencoded", "text/plain", "text/json", ""]
)
def test_a_body_declared_as_anything_but_json_is_refused_before_the_view_runs(client, auth_headers, content_type):
    response = client.post("/api/auth/logout", headers={**auth_headers, "Content-Type": content_type})

    assert_error(response, 400, "Content-Type")
    assert client.get("/api/auth/me", headers=auth_headers).status_code == 200  # not logged out


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS", "HEAD"])
def test_reads_deletes_and_preflights_ignore_a_declared_content_type(client, auth_headers, make_task, method):
    task = make_task()
    path = f"/api/tasks/{task['id']}"
    response = client.open(path, method=method, headers={**auth_headers, "Content-Type": "text/plain"})

    assert response.status_code == 200
    assert client.get("/api/health", headers={"Content-Type": "text/plain"}).status_code == 200


def test_json_with_a_charset_and_requests_without_a_body_are_accepted(client, auth_headers):
    assert client.get("/api/tasks", headers=auth_headers).status_code == 200
    json_utf8 = {**auth_headers, "Content-Type": "application/json; charset=utf-8"}
    assert client.get("/api/tasks", headers=json_utf8).status_code == 200
    assert client.post("/api/auth/logout", headers=json_utf8).status_code == 200


def test_answers_are_encoded_as_flasks_own_encoder_encodes_them(app):
    """orjson (routes.JSONProvider) gives the text Flask's encoder gives, but UTF-8 instead of \\u escapes; what
    orjson cannot encode goes to Flask's encoder instead of failing."""
    flask_json = DefaultJSONProvider(app)
    values = {
        "name": "Müller & Söhne 😀",
        "id": uuid.UUID("6ec0bd7f-11c0-43da-975e-2a8ad9ebae0b"),
        "at": datetime(2025, 1, 15, 10, 0, tzinfo=UTC),
        "day": date(2025, 1, 15),
        "nested": {"b": [1, 2.5, None, True], "a": "x"},
    }
    with app.test_request_context():
        answer = app.json.response(values)
        assert answer.get_data() == flask_json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        assert "Müller".encode() in answer.get_data()
        for awkward in ({"text": "\ud800"}, {"n": 2**64}):  # a lone surrogate; an integer past 64 bits
            assert json.loads(app.json.response(awkward).get_data()) == json.loads(flask_json.dumps(awkward))
