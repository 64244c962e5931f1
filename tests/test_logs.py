import json
import logging
import sys

import pytest
import sqlalchemy as sa

from config import Config, ConfigError
from helpers import PRODUCTION, call, gunicorn
from routes.logs import MASK, formatter, masked


def request_lines(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "finstack.request"]


def test_each_request_logs_one_line_with_its_method_path_status_duration_user_and_request_id(
    client, auth_headers, user, caplog
):
    with caplog.at_level(logging.INFO, logger="finstack.request"):
        response = client.get("/api/tasks?status=open", headers=auth_headers | {"X-Request-ID": "trace-42"})

    assert response.status_code == 200
    [line] = request_lines(caplog)
    assert (line.method, line.path, line.status, line.user_id, line.request_id) == (
        "GET", "/api/tasks", 200, user["id"], "trace-42",
    )  # fmt: skip
    assert isinstance(line.duration_ms, float) and line.duration_ms > 0
    assert "status=open" not in line.getMessage()  # no query strings in logs


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/api/tasks", {}, 401),
        ("GET", "/api/no-such-thing", {}, 404),
        ("POST", "/api/auth/login", {"Content-Type": "text/plain"}, 400),
    ],
)
def test_refused_requests_are_logged_too_without_a_user(client, caplog, method, path, headers, status):
    with caplog.at_level(logging.INFO, logger="finstack.request"):
        response = client.open(path, method=method, headers=headers, data="x" if method == "POST" else None)

    assert response.status_code == status
    [line] = request_lines(caplog)
    assert (line.path, line.status, line.user_id) == (path, status, None)
    assert line.request_id == response.headers["X-Request-ID"]


def test_lines_said_during_a_request_carry_its_request_id(app, caplog):
    @app.get("/api/say")
    def say():
        logging.getLogger("some.library").warning("said")
        return {}

    with caplog.at_level(logging.INFO):
        app.test_client().get("/api/say", headers={"X-Request-ID": "r-7"})

    [said] = [record for record in caplog.records if record.getMessage() == "said"]
    assert said.request_id == "r-7"
    assert [line.request_id for line in request_lines(caplog)] == ["r-7"]


def test_json_lines_are_one_object_each_with_the_request_fields(client, caplog):
    with caplog.at_level(logging.INFO, logger="finstack.request"):
        client.get("/api/health", headers={"X-Request-ID": "json-1"})

    text = formatter("json").format(request_lines(caplog)[0])

    assert "\n" not in text
    line = json.loads(text)
    assert {"time", "level", "logger", "message", "method", "path", "status", "duration_ms", "user_id"} <= set(line)
    assert (line["level"], line["logger"], line["path"], line["status"], line["request_id"]) == (
        "INFO", "finstack.request", "/api/health", 200, "json-1",
    )  # fmt: skip
    assert line["time"].endswith("+00:00")


TOKEN = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    "message",
    [
        f"Authorization: Bearer {TOKEN}",
        f"token {TOKEN} rejected",
        "stored pbkdf2:sha256:600000$AbCdEf$0123456789abcdef",
        "login failed: password=hunter2",
        '{"username": "alice", "new_password": "hunter2"}',
        "JWT_SECRET_KEY=hunter2",
    ],
)
def test_tokens_passwords_and_hashes_are_masked_in_every_format(message):
    record = logging.LogRecord("finstack", logging.ERROR, __file__, 1, "%s", (message,), None)
    try:
        raise RuntimeError(message)
    except RuntimeError:
        record.exc_info = sys.exc_info()

    for log_format in ("json", "text"):
        text = formatter(log_format).format(record)
        assert "hunter2" not in text and TOKEN not in text and "0123456789abcdef" not in text, text
        assert MASK in text


def test_text_lines_carry_the_request_id_and_the_user(client, auth_headers, user, caplog):
    with caplog.at_level(logging.INFO, logger="finstack.request"):
        client.get("/api/tasks", headers=auth_headers | {"X-Request-ID": "text-9"})
        client.get("/api/health", headers={"X-Request-ID": "text-10"})

    signed_in, anonymous = (formatter("text").format(line) for line in request_lines(caplog))
    assert "[text-9] GET /api/tasks 200" in signed_in and signed_in.endswith(f"ms user {user['id']}")
    assert "[text-10] GET /api/health 200" in anonymous and anonymous.endswith("ms user -")
    outside = logging.LogRecord("finstack", logging.INFO, __file__, 1, "starting", (), None)
    assert "[-] starting" in formatter("text").format(outside)  # said outside any request


def test_masking_keeps_what_is_not_secret():
    assert masked("GET /api/tasks 200 3.1 ms user 1f0c") == "GET /api/tasks 200 3.1 ms user 1f0c"


def test_log_format_defaults_to_json_in_production_and_text_in_development():
    assert Config({"APP_ENV": "production"}).LOG_FORMAT == "json"
    assert Config({}).LOG_FORMAT == "text"
    assert Config({"LOG_FORMAT": "JSON"}).LOG_FORMAT == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT must be json or text"):
        Config({"LOG_FORMAT": "xml"})


@pytest.fixture
def production_environment(environment, redis_prefix) -> dict:
    # open registration: the test signs a new account up (production's default is closed)
    return (
        environment
        | PRODUCTION
        | {"RATELIMIT_KEY_PREFIX": redis_prefix, "AUTO_MIGRATE": "true", "REGISTRATION": "open"}
    )


def test_served_logs_are_json_lines_without_passwords_or_tokens(servers, production_environment, tmp_path):
    server = servers.start(gunicorn("--workers", "2"), production_environment)
    first, wrong, changed = "first-password-1", "wrong-password-2", "changed-password-3"
    account = {"username": "logcheck", "email": "log@example.com", "password": first, "full_name": "Log Check"}
    registered = call("POST", f"{server.url}/api/auth/register", account)[1]
    assert call("POST", f"{server.url}/api/auth/login", {"username": "logcheck", "password": wrong})[0] == 401
    session = call("POST", f"{server.url}/api/auth/login", {"username": "logcheck", "password": first})[1]
    access, refresh = session["access_token"], session["refresh_token"]
    change = {"current_password": first, "new_password": changed}
    assert call("PUT", f"{server.url}/api/auth/password", change, access)[0] == 200
    relogin = call("POST", f"{server.url}/api/auth/login", {"username": "logcheck", "password": changed})[1]
    assert call("GET", f"{server.url}/api/auth/me", token=relogin["access_token"][:-4] + "AAAA")[0] == 401
    refreshed = call("POST", f"{server.url}/api/auth/refresh", {"refresh_token": refresh})[1]
    assert call("POST", f"{server.url}/api/auth/logout", token=relogin["access_token"])[0] == 200
    server.stop()
    engine = sa.create_engine(production_environment["DATABASE_URL"])
    with engine.connect() as connection:
        password_hash = connection.execute(sa.text("SELECT password_hash FROM app_users WHERE username = 'logcheck'"))
        password_hash = password_hash.scalar_one()
    engine.dispose()

    lines = [json.loads(line) for line in server.log.read_text().splitlines()]  # every line is JSON

    requests = [line for line in lines if line["logger"] == "finstack.request" and line["path"].startswith("/api/auth")]
    assert [(line["method"], line["path"], line["status"]) for line in requests] == [
        ("POST", "/api/auth/register", 201),
        ("POST", "/api/auth/login", 401),
        ("POST", "/api/auth/login", 200),
        ("PUT", "/api/auth/password", 200),
        ("POST", "/api/auth/login", 200),
        ("GET", "/api/auth/me", 401),
        ("POST", "/api/auth/refresh", 200),
        ("POST", "/api/auth/logout", 200),
    ]
    assert requests[3]["user_id"] == registered["user"]["id"] and requests[5]["user_id"] is None
    assert len({line["request_id"] for line in requests}) == len(requests)
    assert any(line["logger"] == "gunicorn.error" and "Booting worker" in line["message"] for line in lines)
    text = server.log.read_text()
    tokens = [access, refresh, relogin["access_token"], relogin["refresh_token"], *refreshed.values()]
    secrets = [first, wrong, changed, password_hash, password_hash.rpartition("$")[2], *tokens]
    assert set(refreshed) == {"access_token", "refresh_token"}
    assert not [secret for secret in secrets if secret in text]
    assert "Traceback" not in text
