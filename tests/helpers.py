"""Helpers shared by the tests (fixtures live in conftest.py)."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask_jwt_extended import create_access_token, decode_token

import jobs
from config import engine_options, normalise_database_url
from models import User, db
from routes.auth import start_session

POSTGRES_URL = normalise_database_url(os.environ["TEST_DATABASE_URL"]) if os.environ.get("TEST_DATABASE_URL") else None
# Where scratch PostgreSQL databases are made: the suite's server, else the local one (`.ci/run` starts it).
POSTGRES_SERVER = POSTGRES_URL or normalise_database_url("postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FAST_HASH = "scrypt:1024:8:1"
# What production needs: real secrets (random, as an operator would generate them) and a shared limit store.
PRODUCTION = {
    "APP_ENV": "production",
    "SECRET_KEY": secrets.token_urlsafe(48),
    "JWT_SECRET_KEY": secrets.token_urlsafe(48),
    "RATELIMIT_STORAGE_URI": REDIS_URL,
    "METRICS_TOKEN": secrets.token_urlsafe(32),
    "MAIL_BACKEND": "disabled",  # production's email needs a broker, workers and SMTP: test_config.py checks it
}
PASSWORD = "correct-horse-battery"
PUBLIC_USER_FIELDS = {
    "id", "username", "email", "full_name", "is_active", "created_at", "is_admin", "phone", "time_zone",
}  # fmt: skip
ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4
# The server as development runs it: several workers, each building the app at once; and as `make run` does.


def gunicorn(*options: str) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "--workers", str(WORKERS), "--bind", "127.0.0.1:{port}",
            "--no-control-socket", *options, "app:app"]  # fmt: skip


GUNICORN = gunicorn()
DEV_SERVER = [sys.executable, "app.py"]


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
        "JOBS_AFTER_COMMIT": False,  # nothing sent behind the test's back: it delivers itself (Mailbox, jobs.sweep)
        **overrides,
    }


@contextmanager
def scratch_postgres_database(prefix: str = "finstack_test") -> Iterator[str]:
    """A new, empty PostgreSQL database on POSTGRES_SERVER, dropped afterwards, however its connections ended."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    server = sa.create_engine(POSTGRES_SERVER, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with server.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as error:
        server.dispose()
        pytest.fail(f"PostgreSQL at {POSTGRES_SERVER} is needed here (`.ci/run` starts it): {error}")
    try:
        yield sa.make_url(POSTGRES_SERVER).set(database=name).render_as_string(hide_password=False)
    finally:
        with server.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        server.dispose()


def tokens_for(app, user_id: str) -> dict:
    """The access and refresh tokens of a new login session, as a login issues them."""
    with app.app_context():
        tokens = start_session(db.session.get(User, uuid.UUID(user_id)))
        db.session.commit()
        return tokens


def token_for(app, user_id: str, **kwargs) -> str:
    """An access token of a new login session; ``kwargs`` go to create_access_token (``expires_delta=...``)."""
    token = tokens_for(app, user_id)["access_token"]
    if not kwargs:
        return token
    with app.app_context():
        sid = decode_token(token)["sid"]
        user = db.session.get(User, uuid.UUID(user_id))
        return create_access_token(identity=user, additional_claims={"sid": sid}, **kwargs)


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    """One HTTP request on a new connection (so successive calls can land on different workers)."""
    status, answer, _headers = call_with_headers(method, url, body, token)
    return status, answer


def call_with_headers(
    method: str, url: str, body: dict | None = None, token: str | None = None, headers: dict | None = None
) -> tuple[int, dict, dict]:
    """``call`` with request headers of one's own, answering the response's headers too."""
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    request.add_header("Connection", "close")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def wrong_passwords_at_once(url: str, count: int, forwarded_for: Callable[[int], str]) -> list[int]:
    """The statuses of ``count`` logins as admin with wrong passwords, released together, the n-th sent with
    ``X-Forwarded-For: forwarded_for(n)``."""
    together = threading.Barrier(count)

    def guess(n: int) -> int:
        body = {"username": "admin", "password": f"guess-{n}"}
        together.wait()
        return call_with_headers("POST", f"{url}/api/auth/login", body, headers={"X-Forwarded-For": forwarded_for(n)})[
            0
        ]

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(guess, range(count)))


class Server:
    """A server process on a free port, its log in a file, stopped at the end of the test."""

    def __init__(self, command: list[str], env: dict, log: Path):
        self.log = log
        for _attempt in range(3):  # another process may take the free port before the server binds it
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            with log.open("ab") as out:
                self.process = subprocess.Popen(
                    [part.format(port=self.port) for part in command],
                    cwd=ROOT,
                    env=env | {"PORT": str(self.port)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            if self.wait_until_healthy():
                return
        pytest.fail(f"no free port to be had:\n{log.read_text()}")

    def wait_until_healthy(self, timeout: float = 60) -> bool:
        """Wait for this process to say it listens on our port (not some other server), then for a healthy answer.
        False when the port turned out to be taken."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "in use" in self.log.read_text():
                    return False
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            if f"127.0.0.1:{self.port}" in self.log.read_text():
                try:
                    if call("GET", f"{self.url}/api/health")[0] == 200:
                        return True
                except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                    pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"server not healthy after {timeout}s:\n{self.log.read_text()}")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Mailbox:
    """The email an app sends with MAIL_BACKEND=file (its default outside production), as a person would read it.
    ``deliver()`` sends what the outbox holds now (``jobs.sweep``, in the test's thread) and returns the messages
    it wrote, parsed with the standard ``email`` package, oldest first."""

    def __init__(self, app):
        self.app = app
        self.seen: set[Path] = set()

    def folder(self) -> Path:
        return Path(self.app.config["MAIL_DIR"] or Path(self.app.instance_path) / "mail")

    def deliver(self) -> list[EmailMessage]:
        with self.app.app_context():
            jobs.sweep()
        new = sorted(set(self.folder().glob("*.eml")) - self.seen, key=lambda path: path.stat().st_mtime_ns)
        self.seen.update(new)
        return [message_from_bytes(path.read_bytes(), policy=policy.default) for path in new]


@contextmanager
def lock_waits() -> Iterator[Callable[..., None]]:
    """``wait_for(*threads)``: until the requests of ``threads`` wait for a lock this test holds, in this app context.

    PostgreSQL lists lock waits in pg_stat_activity. SQLite has no row locks but one writer at a time, and every
    transaction begins by taking the write lock (BEGIN IMMEDIATE: models._begin_sqlite), which waits while the test
    holds it: a thread is counted as it sends that, and from then on it waits (for at most the driver's busy timeout,
    5 s)."""
    began, changed = set(), threading.Condition()

    def seen(_connection, _cursor, statement, *_args) -> None:
        if statement == "BEGIN IMMEDIATE":
            with changed:
                began.add(threading.current_thread())
                changed.notify_all()

    def wait_for(*threads: threading.Thread) -> None:
        if POSTGRES_URL:
            wait_for_lock_waits(len(threads))
            return
        with changed:
            if not changed.wait_for(lambda: began.issuperset(threads), timeout=10):
                pytest.fail(f"{len(threads)} requests never came to wait for SQLite's write lock")

    if POSTGRES_URL:
        yield wait_for
        return
    sa.event.listen(db.engine, "before_cursor_execute", seen)
    try:
        yield wait_for
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", seen)


def wait_for_lock_waits(count: int, timeout: float = 10) -> None:
    """Until ``count`` other connections of this database wait for a lock (polled: nothing to be told by)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        db.session.execute(sa.text("SELECT pg_stat_clear_snapshot()"))  # the view is read once per transaction
        waiting = db.session.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
        ).scalar()
        if waiting >= count:
            return
        time.sleep(0.01)
    pytest.fail(f"{count} requests never waited for the lock the test holds")


def queued_for_a_lock(app, hold: Callable[[], object], requests: dict[str, Callable]) -> dict:
    """Send ``requests`` (by name: a function of a test client that sends one), each from a thread of its own, while
    this test holds a lock that ``hold()`` takes in its own transaction: each starts once the ones before it wait for
    that lock (``lock_waits``), so that they queue in this order; then the lock goes. Their responses, by name."""
    results = {}

    def run(name: str) -> None:
        results[name] = requests[name](app.test_client())

    racers = [threading.Thread(target=run, args=(name,)) for name in requests]
    with app.app_context(), lock_waits() as wait_for:
        hold()
        for count, racer in enumerate(racers, 1):
            racer.start()
            wait_for(*racers[:count])
        db.session.rollback()
    for racer in racers:
        racer.join(10)
    return results
