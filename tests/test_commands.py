"""`flask` commands, the first administrator, and the migrations that build the schema."""

import logging
import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa

from app import create_app
from commands import prepare_database
from config import ConfigError
from helpers import PRODUCTION, ROOT, settings
from models import User, db


def users(app) -> list[str]:
    with app.app_context():
        return list(db.session.scalars(sa.select(User.username).order_by(User.username)))


def admins(app) -> list[str]:
    with app.app_context():
        return list(db.session.scalars(sa.select(User.username).where(User.is_admin).order_by(User.username)))


def login(app, username: str, password: str) -> int:
    return app.test_client().post("/api/auth/login", json={"username": username, "password": password}).status_code


def test_create_admin_creates_a_user_who_can_log_in(app, runner):
    result = runner.invoke(
        args=["create-admin", "--username", "Root", "--email", "root@example.com", "--password", "long-enough-1"]
    )

    assert result.exit_code == 0, result.output
    assert "Created administrator 'root'" in result.output
    assert users(app) == ["root"]
    assert admins(app) == ["root"]
    assert login(app, "root", "long-enough-1") == 200


def test_create_admin_prompts_for_the_password(app, runner):
    result = runner.invoke(args=["create-admin"], input="long-enough-2\nlong-enough-2\n")

    assert result.exit_code == 0, result.output
    assert login(app, "admin", "long-enough-2") == 200


def test_create_admin_refuses_a_taken_username(app, runner, user):
    result = runner.invoke(args=["create-admin", "--username", "alice", "--password", "long-enough-1"])

    assert result.exit_code == 1
    assert "already taken" in result.output
    assert users(app) == ["alice"]


def test_create_admin_refuses_invalid_details(app, runner):
    result = runner.invoke(args=["create-admin", "--email", "nope", "--password", "short"])

    assert result.exit_code == 2
    assert "email" in result.output and "password" in result.output
    assert users(app) == []


def test_create_admin_is_listed_in_flask_help(runner):
    result = runner.invoke(args=["--help"])

    assert "create-admin" in result.output
    assert "Create an administrator account" in result.output


def started(app):
    """The app after the start-up steps that serving runs (migrations, first admin)."""
    prepare_database(app)
    return app


def development_app(database_url, tmp_path, **overrides):
    """The app as it starts in development: migrations applied, default admin on an empty database."""
    development = {"AUTO_MIGRATE": True, "ADMIN_PASSWORD": "admin123"}
    return started(create_app(settings(database_url, tmp_path, **development | overrides)))


def test_first_start_in_development_creates_the_documented_admin_and_warns(fresh_database_url, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        app = development_app(fresh_database_url, tmp_path)

    assert users(app) == ["admin"]
    assert admins(app) == ["admin"]
    assert login(app, "admin", "admin123") == 200
    with app.app_context():
        assert db.session.scalar(sa.select(User.email)) == "admin@finstack.com"
    assert any("admin123" in r.getMessage() and "change it" in r.getMessage() for r in caplog.records)


def test_later_starts_create_no_second_admin(fresh_database_url, tmp_path, caplog):
    development_app(fresh_database_url, tmp_path)
    caplog.clear()

    with caplog.at_level(logging.WARNING):
        app = development_app(fresh_database_url, tmp_path, ADMIN_USERNAME="other")

    assert users(app) == ["admin"]
    assert not any("administrator" in r.getMessage() for r in caplog.records)


def test_admin_settings_override_the_default(fresh_database_url, tmp_path):
    app = development_app(
        fresh_database_url, tmp_path, ADMIN_USERNAME="boss", ADMIN_EMAIL="boss@finstack.com", ADMIN_PASSWORD="n3w-pass!"
    )

    assert users(app) == ["boss"]
    assert login(app, "boss", "n3w-pass!") == 200


def test_production_creates_an_admin_only_from_admin_settings(fresh_database_url, tmp_path, monkeypatch):
    for name, value in PRODUCTION.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DATABASE_URL", fresh_database_url)
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path / "instance"))
    migrated = started(create_app({"AUTO_MIGRATE": True}))
    assert users(migrated) == []

    monkeypatch.setenv("ADMIN_USERNAME", "ops")
    monkeypatch.setenv("ADMIN_PASSWORD", "0ps-password")

    assert users(started(create_app())) == ["ops"]


def test_a_failing_migration_stops_the_start(fresh_database_url, tmp_path):
    engine = sa.create_engine(fresh_database_url)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE app_users (id INTEGER PRIMARY KEY)"))  # in the migration's way
    engine.dispose()

    with pytest.raises(sa.exc.DBAPIError, match="already exists"):
        development_app(fresh_database_url, tmp_path)


def test_invalid_admin_settings_stop_the_start(fresh_database_url, tmp_path):
    with pytest.raises(ConfigError, match="ADMIN_"):
        development_app(fresh_database_url, tmp_path, ADMIN_USERNAME="not valid!")


POSTGRESQL_ONLY_INDEXES = {
    "ix_tasks_entity_name_sort",
    "ix_tasks_task_type_sort",
    "ix_tasks_entity_name_trgm",
    "ix_tasks_task_type_trgm",
}


def test_migrations_build_the_schema_the_models_describe(fresh_database_url, tmp_path):
    app = create_app(settings(fresh_database_url, tmp_path))
    runner = app.test_cli_runner()

    upgrade = runner.invoke(args=["db", "upgrade"])
    check = runner.invoke(args=["db", "check"])

    assert upgrade.exit_code == 0, upgrade.output
    assert check.exit_code == 0, check.output
    with app.app_context():
        inspector = sa.inspect(db.engine)
        assert set(inspector.get_table_names()) == {"alembic_version", *db.metadata.tables}
        assert set(db.metadata.tables) == {
            "app_users", "tasks", "login_sessions", "revoked_tokens", "task_counts", "task_events", "idempotency_keys",
            "task_day_counts", "time_to_close_counts", "times_to_close", "entity_name_counts", "outbox_messages",
            "one_time_tokens",
        }  # fmt: skip
        # autogenerate compares no check constraints: these are checked here
        checks = {check["name"] for check in inspector.get_check_constraints("tasks")}
        assert checks == {"ck_tasks_status", "ck_tasks_closed_at"}
        model_indexes = {index.name for index in db.metadata.tables["tasks"].indexes}
        expected = model_indexes if db.engine.dialect.name == "postgresql" else model_indexes - POSTGRESQL_ONLY_INDEXES
        assert {index["name"] for index in inspector.get_indexes("tasks")} == expected
        assert len(model_indexes) == 14
        assert {index["name"] for index in inspector.get_indexes("task_counts")} == {"uq_task_counts_key"}
        assert {index["name"] for index in inspector.get_indexes("task_events")} == {"ix_task_events_task_id_id"}
        partial = {
            index["name"]: index["dialect_options"].get(f"{db.engine.dialect.name}_where")
            for index in inspector.get_indexes("tasks")
        }
        assert str(partial["ix_tasks_open_task_time"]).replace("::text", "").replace("(", "").replace(")", "") == (
            "status = 'open' AND deleted_at IS NULL"
        )


def test_migrations_downgrade_to_an_empty_database(fresh_database_url, tmp_path):
    app = started(create_app(settings(fresh_database_url, tmp_path, AUTO_MIGRATE=True)))

    result = app.test_cli_runner().invoke(args=["db", "downgrade", "base"])

    assert result.exit_code == 0, result.output
    with app.app_context():
        assert set(sa.inspect(db.engine).get_table_names()) == {"alembic_version"}


def test_db_check_fails_when_models_and_migrations_disagree(fresh_database_url, tmp_path):
    app = started(create_app(settings(fresh_database_url, tmp_path, AUTO_MIGRATE=True)))
    with app.app_context(), db.engine.begin() as connection:
        connection.execute(sa.text("DROP INDEX ix_tasks_status_id"))

    result = app.test_cli_runner().invoke(args=["db", "check"])

    assert result.exit_code != 0


def flask(*args: str, env: dict, input: str | None = None) -> subprocess.CompletedProcess:
    """`flask ...` as a person types it in the project folder."""
    return subprocess.run(
        [sys.executable, "-m", "flask", *args],
        cwd=ROOT,
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_flask_commands_do_no_start_up_work(environment, tmp_path):
    environment = environment | {"DATABASE_URL": "sqlite:///finstack.db"}  # the default, in the instance folder

    assert flask("--help", env=environment).returncode == 0
    assert flask("routes", env=environment).returncode == 0

    assert not (tmp_path / "instance" / "finstack.db").exists()


def test_flask_create_admin_in_development_creates_only_that_admin(environment, fresh_database_url):
    assert flask("db", "upgrade", env=environment).returncode == 0

    result = flask(
        "create-admin",
        "--username",
        "boss",
        "--email",
        "boss@finstack.com",
        env=environment,
        input="b0ss-pass\nb0ss-pass\n",
    )

    assert result.returncode == 0, result.stderr
    assert database_users(fresh_database_url) == ["boss"]


def test_flask_create_admin_in_production_as_the_readme_says(environment, fresh_database_url):
    production = environment | {
        **PRODUCTION,
        "ADMIN_USERNAME": "ops",
        "ADMIN_EMAIL": "ops@finstack.com",
        "ADMIN_PASSWORD": "0ps-password",
    }
    assert flask("db", "upgrade", env=production).returncode == 0

    result = flask("create-admin", env=production)

    assert result.returncode == 0, result.stderr
    assert "Created administrator 'ops'" in result.stdout
    assert database_users(fresh_database_url) == ["ops"]


@pytest.fixture
def production(environment, fresh_database_url) -> dict:
    """A migrated production database, as a deployment has it before its first administrator."""
    production = environment | PRODUCTION
    assert flask("db", "upgrade", env=production).returncode == 0
    return production


@pytest.mark.parametrize("password", ["password123", "Admin@2024", "Adm1n@123"])
def test_flask_create_admin_in_production_refuses_well_known_passwords(production, fresh_database_url, password):
    given = flask("create-admin", "--username", "ops", "--password", password, env=production)
    from_settings = flask("create-admin", env=production | {"ADMIN_USERNAME": "ops", "ADMIN_PASSWORD": password})

    rule = "Must not be a well-known password such as 'admin123' or 'password123'"
    assert given.returncode == 2 and f"password: {rule}" in given.stderr  # a usage error: what to type instead
    assert from_settings.returncode == 1  # ADMIN_PASSWORD is checked by the same rule, as the app starts
    assert from_settings.stderr.strip() == f"Error: ADMIN_PASSWORD: {rule}: choose a passphrase of your own."
    assert database_users(fresh_database_url) == []


def test_flask_create_admin_in_development_keeps_accepting_simple_passwords(environment, fresh_database_url):
    assert flask("db", "upgrade", env=environment).returncode == 0

    result = flask("create-admin", "--username", "dev", "--password", "password123", env=environment)

    assert result.returncode == 0, result.stderr
    assert database_users(fresh_database_url) == ["dev"]


def test_flask_seed_demo_refuses_production(production, fresh_database_url):
    result = flask("seed-demo", "--users", "2", "--tasks", "10", env=production)

    assert result.returncode == 1
    assert "seed-demo does not run in production" in result.stderr
    assert "'demo-password'" in result.stderr
    assert "Traceback" not in result.stderr
    assert database_users(fresh_database_url) == []


def test_flask_seed_demo_refuses_flask_env_production_too(production, fresh_database_url):
    flask_env = {k: v for k, v in production.items() if k != "APP_ENV"} | {"FLASK_ENV": "production"}

    result = flask("seed-demo", "--users", "2", "--tasks", "10", "--force", env=flask_env)

    assert result.returncode == 1
    assert "seed-demo does not run in production" in result.stderr
    assert database_users(fresh_database_url) == []


def test_flask_create_admin_before_migrating_says_what_to_do(environment, fresh_database_url):
    result = flask("create-admin", "--password", "long-enough-1", env=environment)

    assert result.returncode == 1
    assert "run `flask db upgrade` first" in result.stderr


def test_flask_db_upgrade_sql_only_prints(environment, fresh_database_url):
    result = flask("db", "upgrade", "--sql", env=environment)

    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE tasks" in result.stdout
    engine = sa.create_engine(fresh_database_url)
    assert sa.inspect(engine).get_table_names() == []
    engine.dispose()


def database_users(url: str) -> list[str]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        names = connection.execute(sa.text("SELECT username FROM app_users ORDER BY username")).scalars().all()
    engine.dispose()
    return names


@pytest.mark.parametrize(
    ("accounts", "admin_setting", "expected"),
    [
        (["early-bird", "admin", "bob"], {}, "admin"),  # someone registered before the admin was created
        (["alice", "ops", "bob"], {"ADMIN_USERNAME": "Ops"}, "ops"),
        (["alice", "bob"], {}, "alice"),  # no such account: the oldest one
    ],
)
def test_upgrading_an_existing_database_keeps_its_administrator_in_charge(
    fresh_database_url, tmp_path, accounts, admin_setting, expected
):
    app = create_app(settings(fresh_database_url, tmp_path, **admin_setting))
    runner = app.test_cli_runner()
    assert runner.invoke(args=["db", "upgrade", "0001"]).exit_code == 0
    engine = sa.create_engine(fresh_database_url)
    with engine.begin() as connection:
        for n, username in enumerate(accounts):
            connection.execute(
                sa.text(
                    "INSERT INTO app_users (id, username, email, password_hash, full_name, is_active, created_at) "
                    "VALUES (:id, :username, :email, 'x', :username, :active, :created_at)"
                ),
                {
                    "id": uuid.uuid4().hex if engine.dialect.name == "sqlite" else str(uuid.uuid4()),
                    "username": username,
                    "email": f"{username}@example.com",
                    "active": True,
                    "created_at": f"2025-01-0{n + 1} 09:00:00",
                },
            )
    engine.dispose()

    result = runner.invoke(args=["db", "upgrade"])

    assert result.exit_code == 0, result.output
    assert admins(app) == [expected]


def test_purge_tokens_is_listed_in_flask_help(runner):
    assert "purge-tokens" in runner.invoke(args=["--help"]).output
