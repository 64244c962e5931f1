from datetime import datetime
from pathlib import Path

import flask_migrate
import pytest

from app import MIGRATIONS, create_app
from helpers import POSTGRES_URL, assert_error, settings
from models import db

LATEST = max(path.name.partition("_")[0] for path in Path(MIGRATIONS, "versions").glob("0*.py"))


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


@pytest.fixture
def migrated_app(fresh_database_url, tmp_path):
    """An app on a database that `flask db upgrade` made, as production's are."""
    app = create_app(settings(fresh_database_url, tmp_path))
    with app.app_context():
        flask_migrate.upgrade()
    yield app
    with app.app_context():
        db.engine.dispose()


def test_ready_when_the_schema_is_at_the_latest_migration(migrated_app):
    response = migrated_app.test_client().get("/api/health/ready")

    assert response.status_code == 200
    body = response.get_json()
    assert (body["status"], body["database"]) == ("ready", "ok")
    assert body["migration"]["current"] == body["migration"]["expected"] == [LATEST]


def test_not_ready_on_a_database_that_was_never_migrated(fresh_database_url, tmp_path):
    app = create_app(settings(fresh_database_url, tmp_path))

    response = app.test_client().get("/api/health/ready")

    body = assert_ready_error(response)
    assert body["database"] == "not migrated" and "flask db upgrade" in body["error"]
    with app.app_context():
        db.engine.dispose()


def test_not_ready_while_a_migration_is_pending(migrated_app):
    with migrated_app.app_context():
        flask_migrate.downgrade(revision="-1")

    response = migrated_app.test_client().get("/api/health/ready")

    body = assert_ready_error(response)
    assert body["database"] == "not migrated"
    assert body["migration"]["expected"] == [LATEST] and body["migration"]["current"] != [LATEST]
    assert migrated_app.test_client().get("/api/health").status_code == 200  # alive, only not ready


def test_not_ready_when_the_database_is_unreachable(tmp_path):
    app = create_app(settings(unreachable_database_url(tmp_path), tmp_path))

    body = assert_ready_error(app.test_client().get("/api/health/ready"))

    assert body["database"] == "unavailable"


def assert_ready_error(response) -> dict:
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert isinstance(body["error"], str) and body["error"] and body["details"] == {}
    return body
