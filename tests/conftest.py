"""Fixtures. Unset TEST_DATABASE_URL: SQLite, a new file per test (a copy of one made with the schema). Set: that
PostgreSQL database, each test inside a transaction that is rolled back (the app's commits become savepoints), or,
marked ``own_database``, a new database of its own.

Tests that start processes (every test using ``environment``, so every ``servers`` test) are marked ``slow`` here;
`make check` leaves the slow ones out."""

import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
import redis
import sqlalchemy as sa
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import Flask
from flask_sqlalchemy.session import _app_ctx_id
from sqlalchemy.orm import scoped_session, sessionmaker

from app import MIGRATIONS, create_app
from helpers import PASSWORD, POSTGRES_URL, REDIS_URL, Mailbox, Server, scratch_postgres_database, settings, token_for
from models import Task, User, db
from schemas import TaskSchema

# Settings the app reads from the environment; tests start from none of them, whatever the shell has.
APP_ENVIRONMENT = (
    "APP_ENV",
    "FLASK_ENV",
    "FLASK_DEBUG",
    "REGISTRATION",
    "ALLOWED_EMAIL_DOMAINS",
    "HOST",
    "PORT",
    "DATABASE_URL",
    "INSTANCE_PATH",
    "AUTO_MIGRATE",
    "SECRET_KEY",
    "JWT_SECRET_KEY",
    "PASSWORD_HASH_METHOD",
    "ADMIN_USERNAME",
    "ADMIN_EMAIL",
    "ADMIN_PASSWORD",
    "CORS_ORIGIN",
    "LOG_LEVEL",
    "TRUSTED_PROXY_COUNT",
    "RATELIMIT_ENABLED",
    "RATELIMIT_STORAGE_URI",
    "RATELIMIT_DEFAULT",
    "RATELIMIT_LOGIN",
    "RATELIMIT_LOGIN_FAILURES",
    "RATELIMIT_LOGIN_FAILURES_ACCOUNT",
    "RATELIMIT_REGISTER",
    "RATELIMIT_REFRESH",
    "RATELIMIT_ACCOUNT_EMAIL",
    "DEFAULT_TIME_ZONE",
    "RATELIMIT_KEY_PREFIX",
    "LOG_FORMAT",
    "METRICS_ENABLED",
    "METRICS_TOKEN",
    "DB_POOL_SIZE",
    "DB_MAX_OVERFLOW",
    "DB_CONNECT_TIMEOUT",
    "DB_STATEMENT_TIMEOUT",
    "PROMETHEUS_MULTIPROC_DIR",
    "MAIL_BACKEND",
    "MAIL_SERVER",
    "MAIL_PORT",
    "MAIL_SECURITY",
    "MAIL_USERNAME",
    "MAIL_PASSWORD",
    "MAIL_TIMEOUT",
    "MAIL_CA_FILE",
    "MAIL_FROM",
    "MAIL_MESSAGE_ID_DOMAIN",
    "MAIL_DIR",
    "FIRM_NAME",
    "FRONTEND_URL",
    "CELERY_BROKER_URL",
    "CELERY_QUEUE",
)

SCHEMA_CREATED = pytest.StashKey[bool]()
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MIGRATION_SCRIPTS = ScriptDirectory(MIGRATIONS)
# test_failure.py needs PostgreSQL in any run (it cuts a TCP line between the app and it) and covers both databases
# itself; test_query_plans.py and test_analytics_postgresql.py check PostgreSQL's plans. They are collected in the
# PostgreSQL run only, so once per `make test`, and never skipped. (A path named on the command line is collected
# whatever this says.)
collect_ignore = [] if POSTGRES_URL else ["test_failure.py", "test_query_plans.py", "test_analytics_postgresql.py"]


def pytest_report_header(config):
    return f"database: {POSTGRES_URL or 'SQLite (a new file per test)'}"


def pytest_collection_modifyitems(items):
    """A test that uses ``environment`` starts a process with it (a server, `flask ...`): mark it ``slow``."""
    for item in items:
        definitions = item._fixtureinfo.name2fixturedefs.get("environment") if hasattr(item, "_fixtureinfo") else None
        # the fixture (or a module's own version of it), not a parameter of that name as test_config.py has
        if definitions and definitions[-1].func.__name__ == "environment":
            item.add_marker(pytest.mark.slow)


def pytest_make_parametrize_id(config, val, argname):
    """A parameter that is a UUID (made at random when the module is collected) is named "uuid" in the test's id:
    every pytest-xdist worker (`make check`) must collect the same tests."""
    if isinstance(val, uuid.UUID) or (isinstance(val, str) and UUID_TEXT.fullmatch(val)):
        return "uuid"
    return None


def schema_engine() -> sa.Engine:
    # A lock timeout: a connection some test leaked makes DROP TABLE fail loudly instead of waiting forever.
    return sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 5, "options": "-c lock_timeout=10s"})


def postgres_listening(url: str) -> bool:
    address = sa.make_url(url)
    try:
        socket.create_connection((address.host or "127.0.0.1", address.port or 5432), timeout=3).close()
    except OSError:
        return False
    return True


def pytest_sessionstart(session):
    """Create the PostgreSQL schema once. No server listening skips the run (fails it when CI=true); a server
    that refuses the connection (no such database, wrong password) always fails it."""
    if POSTGRES_URL is None:
        return
    if not postgres_listening(POSTGRES_URL):
        if os.environ.get("CI", "").lower() == "true":
            pytest.exit(f"No PostgreSQL listening for {POSTGRES_URL}, and CI=true.", returncode=1)
        pytest.exit(f"No PostgreSQL listening for {POSTGRES_URL}; skipping the PostgreSQL run.", returncode=0)
    engine = schema_engine()
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as error:
        pytest.exit(f"PostgreSQL at {POSTGRES_URL} refused the connection: {error}", returncode=1)
    db.metadata.drop_all(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        create_schema(connection)
    engine.dispose()
    session.config.stash[SCHEMA_CREATED] = True


def pytest_sessionfinish(session, exitstatus):
    if session.config.stash.get(SCHEMA_CREATED, False) and exitstatus != pytest.ExitCode.INTERRUPTED:
        engine = schema_engine()
        db.metadata.drop_all(engine)
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        engine.dispose()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in APP_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def app_overrides(request) -> dict:
    """Settings from the test's ``app_config`` marker and, when it uses them, its ``rate_limit_storage`` and
    ``redis_prefix``."""
    marker = request.node.get_closest_marker("app_config")
    overrides = dict(marker.kwargs) if marker else {}
    if "rate_limit_storage" in request.fixturenames:
        overrides |= request.getfixturevalue("rate_limit_storage")
    if "redis_prefix" in request.fixturenames:
        overrides["RATELIMIT_KEY_PREFIX"] = request.getfixturevalue("redis_prefix")
    return overrides


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of the test's own in the real Redis; its keys are deleted afterwards."""
    prefix = f"finstack-test-{uuid.uuid4().hex}"
    store = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        store.ping()
    except redis.ConnectionError as error:
        pytest.fail(f"Redis at {REDIS_URL} is not reachable ({error}): start it (`.ci/run` does).")
    yield prefix
    for key in store.scan_iter(f"*{prefix}*"):
        store.delete(key)
    store.close()


@pytest.fixture(params=["memory", "redis"])
def rate_limit_storage(request) -> dict:
    """Run the test with limits counted in memory and in the real Redis (under a key prefix of its own)."""
    if request.param == "memory":
        return {"RATELIMIT_STORAGE_URI": "memory://"}
    return {"RATELIMIT_STORAGE_URI": REDIS_URL, "RATELIMIT_KEY_PREFIX": request.getfixturevalue("redis_prefix")}


def create_schema(connection: sa.Connection) -> None:
    """The tables the models describe (which the migrations must build: test_commands.py checks), stamped with
    the latest migration as `flask db upgrade` would leave them, so that the app counts as ready."""
    db.metadata.create_all(connection)
    MigrationContext.configure(connection).stamp(MIGRATION_SCRIPTS, "heads")


def without_fsync(dbapi_connection, _connection_record):
    """A test's SQLite file need not survive a power cut: commits skip fsync (milliseconds each on this disk)."""
    dbapi_connection.execute("PRAGMA synchronous = OFF")


@pytest.fixture(scope="session")
def sqlite_schema(tmp_path_factory):
    """An SQLite file with the schema, made once: each test's database starts as a copy of it, which costs a
    fraction of creating the tables, indexes and triggers again."""
    path = tmp_path_factory.mktemp("schema") / "schema.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        create_schema(connection)
    engine.dispose()
    return path


@pytest.fixture
def app(request, tmp_path):
    overrides = app_overrides(request)
    if POSTGRES_URL is None:
        shutil.copyfile(request.getfixturevalue("sqlite_schema"), tmp_path / "test.db")
        app = create_app(settings(f"sqlite:///{tmp_path / 'test.db'}", tmp_path, **overrides))
        with app.app_context():
            sa.event.listen(db.engine, "connect", without_fsync)
            db.engine.dispose()  # any connection opened so far goes: each one from now on is set so
        yield app
        app.extensions["jobs"].stop()
        with app.app_context():
            db.engine.dispose()
        return

    if request.node.get_closest_marker("own_database"):
        yield from app_with_own_postgres_database(tmp_path, overrides)
        return

    app = create_app(settings(POSTGRES_URL, tmp_path, **overrides))
    with app.app_context():
        connection = db.engine.connect()
    transaction = connection.begin()
    # Flask-SQLAlchemy's session always picks the app's engine, so swap in a plain session bound
    # to this connection, scoped per app context like the real one.
    app_session = db.session
    db.session = scoped_session(
        sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False),
        scopefunc=_app_ctx_id,
    )
    try:
        yield app
    finally:
        app.extensions["jobs"].stop()  # its threads gone before the connection they share with the test goes
        db.session = app_session  # sessions of the test's app contexts were removed as each one ended
        transaction.rollback()
        connection.close()
        with app.app_context():
            db.engine.dispose()


def app_with_own_postgres_database(tmp_path, overrides: dict) -> Iterator[Flask]:
    """An app on a new database whose commits are real, dropped afterwards. One transaction per test is no
    place for thousands of commits: each becomes a savepoint, and past 64 of them PostgreSQL looks every
    subtransaction up again to tell which rows each statement sees, so each statement costs more than the last."""
    with scratch_postgres_database() as url:
        engine = sa.create_engine(url)
        with engine.begin() as connection:
            create_schema(connection)
        engine.dispose()
        app = create_app(settings(url, tmp_path, **overrides))
        try:
            yield app
        finally:
            app.extensions["jobs"].stop()
            with app.app_context():
                db.engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def make_user(app):
    """Add a user directly; returns a dict of its fields and its password."""

    def make(username: str, **overrides) -> dict:
        fields = {"email": f"{username}@example.com", "full_name": username.title(), "is_active": True} | overrides
        with app.app_context():
            user = User(username=username, **fields)
            user.set_password(PASSWORD)
            db.session.add(user)
            db.session.commit()
            return {"id": str(user.id), "username": username, "password": PASSWORD, **fields}

    return make


@pytest.fixture
def user(make_user):
    return make_user("alice", full_name="Alice Adams")


@pytest.fixture
def other_user(make_user):
    return make_user("bob", full_name="Bob Brown")


@pytest.fixture
def admin(make_user):
    return make_user("root", full_name="Rita Root", is_admin=True)


@pytest.fixture
def auth_headers(app, user):
    return {"Authorization": f"Bearer {token_for(app, user['id'])}"}


@pytest.fixture
def admin_headers(app, admin):
    return {"Authorization": f"Bearer {token_for(app, admin['id'])}"}


@pytest.fixture
def other_headers(app, other_user):
    return {"Authorization": f"Bearer {token_for(app, other_user['id'])}"}


@pytest.fixture
def make_task(app, user):
    """Add a task directly (so read-only fields such as date_created can be set); returns its API form."""

    def make(**overrides) -> dict:
        fields = {
            "entity_name": "ABC Corporation",
            "task_type": "Call",
            "task_time": datetime(2025, 1, 15, 10, 0, tzinfo=UTC),
            "status": "open",
            "contact_person_id": uuid.UUID(user["id"]),
            "created_by_id": uuid.UUID(user["id"]),
        } | overrides
        if fields["status"] == "closed":  # a closed task says when (the database checks it)
            fields.setdefault("closed_at", fields.get("updated_at") or datetime.now(UTC))
        with app.app_context():
            task = Task(**fields)
            db.session.add(task)
            db.session.commit()
            db.session.expunge_all()  # read it back as the API would, with its people
            return TaskSchema().dump(db.session.get(Task, task.id))

    return make


@pytest.fixture
def mailbox(app) -> Mailbox:
    """The email the app sends: ``mailbox.deliver()`` sends what its outbox holds and returns the new messages."""
    return Mailbox(app)


@pytest.fixture
def frozen_now(monkeypatch):
    """Freeze the dashboard's clock at ``now`` (the real now unless given), so each boundary can be hit exactly."""

    def freeze(now: datetime | None = None) -> datetime:
        now = now or datetime.now(UTC)
        monkeypatch.setattr("routes.analytics.utcnow", lambda: now)
        return now

    return freeze


@pytest.fixture
def sql_statements(app):
    """``with sql_statements() as statements:`` records the queries the app sends (transaction control aside)."""

    @contextmanager
    def counting():
        statements = []

        def record(_conn, _cursor, statement, *_args):
            if not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE", "ROLLBACK")):
                statements.append(statement)

        with app.app_context():
            engine = db.engine
        sa.event.listen(engine, "before_cursor_execute", record)
        try:
            yield statements
        finally:
            sa.event.remove(engine, "before_cursor_execute", record)

    return counting


@pytest.fixture
def fresh_database_url(tmp_path):
    """An empty database of the kind under test, for migrations and real servers; dropped afterwards."""
    if POSTGRES_URL is None:
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with scratch_postgres_database() as url:
        yield url


@pytest.fixture
def environment(fresh_database_url, tmp_path) -> dict:
    """A development environment as a new machine has it: no secrets, no admin settings."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "APP_ENV": "development",
        "DATABASE_URL": fresh_database_url,
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "LOG_LEVEL": "INFO",
        "FLASK_SKIP_DOTENV": "1",  # a developer's .env must not leak into the servers under test
    }


class Servers:
    """Servers started by one test, all stopped when it ends."""

    def __init__(self, log_folder):
        self.log_folder = log_folder
        self.started = []

    def start(self, command: list[str], env: dict) -> Server:
        server = Server(command, env, self.log_folder / f"server-{len(self.started)}.log")
        self.started.append(server)
        return server

    def stop_all(self):
        for server in self.started:
            server.stop()


@pytest.fixture
def servers(tmp_path, environment):
    """Started servers; set up after their database (through ``environment``), so stopped before it is dropped."""
    started = Servers(tmp_path)
    yield started
    started.stop_all()
