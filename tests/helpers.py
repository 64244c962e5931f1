"""Helpers shared by the tests (fixtures live in conftest.py)."""

import os
import uuid

from flask_jwt_extended import create_access_token

from config import engine_options, normalise_database_url
from models import User, db

POSTGRES_URL = normalise_database_url(os.environ["TEST_DATABASE_URL"]) if os.environ.get("TEST_DATABASE_URL") else None
FAST_HASH = "scrypt:1024:8:1"
PASSWORD = "correct-horse-battery"


def settings(database_url: str, tmp_path, **overrides) -> dict:
    """Test settings: a throwaway instance folder, fixed secrets, a cheap password hash, no start-up work."""
    return {
        "TESTING": True,
        "SQLALCHEMY_DATABASE_URI": database_url,
        "SQLALCHEMY_ENGINE_OPTIONS": engine_options(database_url),
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "SECRET_KEY": "test-secret-key-0123456789-0123456789-0123456789",
        "JWT_SECRET_KEY": "test-jwt-secret-key-0123456789-0123456789-0123456789",
        "PASSWORD_HASH_METHOD": FAST_HASH,
        "AUTO_MIGRATE": False,
        "ADMIN_PASSWORD": None,
        **overrides,
    }


def token_for(app, user_id: str, **kwargs) -> str:
    with app.app_context():
        return create_access_token(identity=db.session.get(User, uuid.UUID(user_id)), **kwargs)


def assert_error(response, status: int, *fields: str) -> dict:
    """The response is the error envelope with ``status``, naming ``fields`` in its details."""
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error", "details"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["details"], dict)
    for field in fields:
        assert field in body["details"], body
        assert field in body["error"], body
    return body
