"""Settings from the environment, secrets, production refusals, CORS and database wiring."""

import re
import stat
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from app import create_app
from commands import prepare_database
from config import Config, ConfigError, normalise_database_url
from helpers import assert_error, settings
from models import Task, db

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db.render.com:5432/finstack", "postgresql+psycopg2://u:p@db.render.com:5432/finstack"),
        ("postgresql://u:p@localhost/finstack", "postgresql+psycopg2://u:p@localhost/finstack"),
        ("postgresql+psycopg2://u@localhost/finstack", "postgresql+psycopg2://u@localhost/finstack"),
        ("sqlite:///finstack.db", "sqlite:///finstack.db"),
        ("sqlite:////var/data/finstack.db", "sqlite:////var/data/finstack.db"),
    ],
)
def test_database_url_is_normalised_for_psycopg2(given, expected):
    assert normalise_database_url(given) == expected
    assert expected == Config({"DATABASE_URL": given}).SQLALCHEMY_DATABASE_URI


def test_defaults_need_no_environment():
    config = Config({})

    assert config.APP_ENV == "development"
    assert config.SQLALCHEMY_DATABASE_URI == "sqlite:///finstack.db"
    assert config.AUTO_MIGRATE is True
    assert config.CORS_ORIGINS == ["http://localhost:4200", "http://127.0.0.1:4200"]
    assert (config.ADMIN_USERNAME, config.ADMIN_EMAIL, config.ADMIN_PASSWORD) == (
        "admin",
        "admin@finstack.com",
        "admin123",
    )
    assert config.MAX_CONTENT_LENGTH == 1024 * 1024


def test_production_defaults_migrate_nothing_and_create_no_admin():
    config = Config({"APP_ENV": "production"})

    assert config.AUTO_MIGRATE is False
    assert config.ADMIN_PASSWORD is None


def test_cors_origin_is_a_comma_separated_list():
    config = Config({"CORS_ORIGIN": "https://app.finstack.com, https://staging.finstack.com,"})

    assert config.CORS_ORIGINS == ["https://app.finstack.com", "https://staging.finstack.com"]


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"AUTO_MIGRATE": "sometimes"}, "AUTO_MIGRATE must be true or false"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL must be"),
    ],
)
def test_a_malformed_setting_is_a_clear_error(environment, message):
    with pytest.raises(ConfigError, match=message):
        Config(environment)


def test_env_example_documents_every_setting():
    read = set(re.findall(r'env\("([A-Z_]+)"', (ROOT / "config.py").read_text()))
    documented = set(re.findall(r"^#? ?([A-Z_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))

    assert read <= documented, read - documented


def test_development_generates_secrets_once_and_keeps_them(tmp_path):
    config = settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, SECRET_KEY=None, JWT_SECRET_KEY=None)

    first = create_app(config)
    second = create_app(config)

    assert len(first.config["SECRET_KEY"]) >= 32
    assert len(first.config["JWT_SECRET_KEY"]) >= 32
    assert first.config["SECRET_KEY"] != first.config["JWT_SECRET_KEY"]
    assert (second.config["SECRET_KEY"], second.config["JWT_SECRET_KEY"]) == (
        first.config["SECRET_KEY"],
        first.config["JWT_SECRET_KEY"],
    )
    secret_file = tmp_path / "instance" / "jwt_secret_key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


def test_an_empty_secret_file_is_replaced(tmp_path):
    (tmp_path / "instance").mkdir()
    (tmp_path / "instance" / "jwt_secret_key").write_text("")
    config = settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, JWT_SECRET_KEY=None)

    app = create_app(config)

    assert len(app.config["JWT_SECRET_KEY"]) >= 32
    assert (tmp_path / "instance" / "jwt_secret_key").read_text() == app.config["JWT_SECRET_KEY"]


def test_token_from_before_a_restart_stays_valid(tmp_path):
    config = settings(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, SECRET_KEY=None, JWT_SECRET_KEY=None)
    before = create_app(config)
    with before.app_context():
        db.create_all()
    before.test_client().post(
        "/api/auth/register",
        json={"username": "erin", "email": "erin@example.com", "password": "long-enough-1", "full_name": "Erin"},
    )
    token = (
        before.test_client()
        .post("/api/auth/login", json={"username": "erin", "password": "long-enough-1"})
        .get_json()["access_token"]
    )

    after = create_app(config)

    assert after.test_client().get("/api/auth/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"JWT_SECRET_KEY": "j" * 40}, "SECRET_KEY must be set"),
        ({"SECRET_KEY": "s" * 40}, "JWT_SECRET_KEY must be set"),
        ({"SECRET_KEY": "too-short", "JWT_SECRET_KEY": "j" * 40}, "SECRET_KEY must be at least 32 bytes"),
        ({"SECRET_KEY": "s" * 40, "JWT_SECRET_KEY": "short"}, "JWT_SECRET_KEY must be at least 32 bytes"),
    ],
)
def test_production_refuses_to_start_without_real_secrets(monkeypatch, tmp_path, environment, message):
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'db.sqlite'}")
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path / "instance"))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(ConfigError, match=message):
        create_app()
    assert not (tmp_path / "instance" / "secret_key").exists()


def test_production_starts_with_real_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'db.sqlite'}")
    monkeypatch.setenv("SECRET_KEY", "s" * 40)
    monkeypatch.setenv("JWT_SECRET_KEY", "j" * 40)
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path / "instance"))

    app = create_app()

    assert app.config["SECRET_KEY"] == "s" * 40


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


def test_everything_but_login_register_health_needs_a_token(app, client):
    public = {"/api/auth/login", "/api/auth/register", "/api/health"}
    rules = [rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"]

    for rule in rules:
        path = rule.rule.replace("<uuid:task_id>", str(uuid.uuid4()))
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            response = client.open(path, method=method, json={})
            if rule.rule in public:
                assert response.status_code != 401, (method, path)
            else:
                assert_error(response, 401)
    assert {rule.rule for rule in rules} >= public


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
