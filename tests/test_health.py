from datetime import datetime

from app import create_app
from helpers import POSTGRES_URL, assert_error, settings


def test_health_reports_ok_without_a_token(client):
    response = client.get("/api/health")

    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert body["version"] == "1.0.0"
    assert datetime.fromisoformat(body["timestamp"]).utcoffset() is not None


def unreachable_database_url(tmp_path) -> str:
    if POSTGRES_URL is None:
        return f"sqlite:///{tmp_path / 'no-such-folder' / 'finstack.db'}"
    return "postgresql+psycopg2://postgres@127.0.0.1:1/finstack"  # nothing listens on port 1


def test_health_is_503_when_the_database_is_unreachable(tmp_path):
    app = create_app(settings(unreachable_database_url(tmp_path), tmp_path))

    response = app.test_client().get("/api/health")

    assert response.status_code == 503
    body = response.get_json()
    assert body["database"] == "unavailable"
    assert body["error"] and body["details"] == {}


def test_api_requests_are_503_with_the_envelope_when_the_database_is_unreachable(tmp_path):
    app = create_app(settings(unreachable_database_url(tmp_path), tmp_path))
    client = app.test_client()

    assert_error(client.post("/api/auth/login", json={"username": "alice", "password": "whatever"}), 503)
