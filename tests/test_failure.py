"""Failures in production: the database going away under traffic, a worker killed, the server told to stop.

Real gunicorn servers (four workers, gunicorn.conf.py) under traffic from threads. The database tests put a TCP
proxy (tcp_proxy.py) between the app and PostgreSQL and cut it, or make it a black hole, then restore it: they
need PostgreSQL whatever the run, so this module always uses a PostgreSQL server (TEST_DATABASE_URL's, else the
local one), runs its worker and shutdown tests on each database in turn, and is left out of the SQLite run
(conftest.py's ``collect_ignore``): it runs once per `make test`."""

import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask
from tcp_proxy import TcpProxy
from test_task_counts import kept_and_recounted

import config
from app import create_app
from config import normalise_database_url
from helpers import GUNICORN, PRODUCTION, ROOT, WORKERS, scratch_postgres_database, settings
from models import TASK_STATUSES, Task, db

MIGRATION_LOCK_KEY = 7_206_310_001  # migrations/env.py's

# The app's database timeouts in these tests, and what they promise. Before it answers 503, a request meets at
# most one wait for an answer that never comes (a statement: the statement timeout; a dead line: config.py's
# tcp_user_timeout, the longer) and one connect that fails; then it answers within both, with room for two busy
# cores. The client waits a little longer than that, so that a request that hangs shows as one.
CONNECT_TIMEOUT = 2  # s, DB_CONNECT_TIMEOUT
STATEMENT_TIMEOUT = 3  # s, DB_STATEMENT_TIMEOUT (in ms)
LINE_TIMEOUT = 10  # s, tcp_user_timeout in config.py's engine_options
REQUEST_BOUND = max(STATEMENT_TIMEOUT, LINE_TIMEOUT) + CONNECT_TIMEOUT + 3
CLIENT_TIMEOUT = REQUEST_BOUND + 5
RECOVERY_BOUND = REQUEST_BOUND  # after the database returns, the first request that can succeed does
GRACEFUL_TIMEOUT = 30  # gunicorn.conf.py
PAUSE = 0.02  # between one thread's requests: traffic, not a benchmark, on two shared cores
TASK_TYPES = ("Call", "Meeting", "Email", "Follow-up")


@dataclass
class Answer:
    """What one request got: an HTTP status and body, or no status and the error that came instead."""

    method: str
    path: str
    sent: dict | None
    started: float  # time.monotonic()
    elapsed: float
    status: int | None
    body: object

    @property
    def ended(self) -> float:
        return self.started + self.elapsed

    def __repr__(self) -> str:
        body = self.body if not isinstance(self.body, dict) else {k: self.body[k] for k in list(self.body)[:2]}
        return f"<{self.method} {self.path} -> {self.status} after {self.elapsed:.2f}s: {body!r:.160}>"


def send(server, method: str, path: str, body: dict | None = None, token: str | None = None) -> Answer:
    """One request on a new connection (so requests spread over the workers), timed. Refused, reset or timed out,
    it still gives an Answer."""
    headers = {"Connection": "close"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=CLIENT_TIMEOUT)
    started = time.monotonic()
    try:
        connection.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = connection.getresponse()
        status, content_type, payload = response.status, response.getheader("Content-Type") or "", response.read()
    except (OSError, http.client.HTTPException) as error:
        status, content_type, payload = None, "", error
    finally:
        connection.close()
    elapsed = time.monotonic() - started
    if status is not None:
        payload = payload.decode(errors="replace")
        if content_type.startswith("application/json"):
            with suppress(ValueError):
                payload = json.loads(payload)
    return Answer(method, path, body, started, elapsed, status, payload)


def succeeded(answer: Answer) -> bool:
    return answer.status in (200, 201)


def unavailable(answer: Answer) -> bool:
    """A 503 in the error envelope, in JSON: what the API answers while its database is away."""
    body = answer.body
    return (
        answer.status == 503
        and isinstance(body, dict)
        and set(body) == {"error", "details"}
        and isinstance(body["error"], str)
        and body["error"] != ""
        and body["details"] == {}
    )


def health_unavailable(answer: Answer) -> bool:
    """A 503 from a health check: its own fields, and the error envelope's."""
    body = answer.body
    return (
        answer.status == 503
        and isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and body["error"] != ""
        and body.get("details") == {}
    )


class Traffic:
    """Threads sending requests one after another until the block ends; every answer is kept."""

    def __init__(self, threads: int, request: Callable[[random.Random], Answer]):
        self.answers: list[Answer] = []
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(request, random.Random(n)), daemon=True) for n in range(threads)
        ]

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT + 5)  # a request in flight ends by the client's timeout at the latest

    def _run(self, request: Callable[[random.Random], Answer], rng: random.Random) -> None:
        while not self._stopping.is_set():
            self.answers.append(request(rng))
            self._stopping.wait(PAUSE)

    def wait_for(self, condition: Callable[[list[Answer]], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition(list(self.answers)):
            assert time.monotonic() < deadline, f"the traffic did not get there: {self.answers[-5:]}"
            time.sleep(0.05)


def new_task(admin_id: str) -> dict:
    """A task whose entity name is its own, so that the row stored for it can be found and compared."""
    return {
        "entity_name": f"Entity {uuid.uuid4().hex}",
        "task_type": random.choice(TASK_TYPES),
        "task_time": "2025-03-01T09:30:00+00:00",
        "contact_person_id": admin_id,
        "note": "written under failure",
    }


def admin_session(server, password: str) -> tuple[str, str]:
    answer = send(server, "POST", "/api/auth/login", {"username": "admin", "password": password})
    assert answer.status == 200, answer
    return answer.body["access_token"], answer.body["user"]["id"]


def acknowledged(answers: list[Answer]) -> list[Answer]:
    """The creates that answered 201: tasks the client was told are stored."""
    return [answer for answer in answers if answer.method == "POST" and answer.status == 201]


def workers_of(master: int) -> set[int]:
    """The live child processes of gunicorn's master, from /proc (the fourth field of /proc/<pid>/stat is the
    parent; a worker killed but not yet reaped is a zombie, "Z", and is left out)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rpartition(")")[2].split()[:2]
        except (OSError, ValueError):
            continue  # the process ended meanwhile
        if int(parent) == master and state != "Z":
            children.add(int(stat.parent.name))
    return children


def wait_for_workers(master: int, condition: Callable[[set[int]], bool], timeout: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout
    while not condition(workers := workers_of(master)):
        assert time.monotonic() < deadline, f"gunicorn's workers are {sorted(workers)}"
        time.sleep(0.05)
    return workers


def database_rows(url: str, table) -> list[sa.Row]:
    """Every row of ``table``, read straight from the database (never through the proxy)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.select(table)).all()
    finally:
        engine.dispose()


@pytest.fixture
def fresh_database_url(request, tmp_path) -> Iterator[str]:
    """An empty database, dropped afterwards: PostgreSQL unless the test asks for SQLite (``indirect``
    parametrisation). This module's own, whatever the run; conftest's ``environment`` and ``servers`` use it."""
    if getattr(request, "param", "postgresql") == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with scratch_postgres_database("finstack_failure") as url:
        yield url


# The database goes away -------------------------------------------------------------------------------------


@pytest.fixture
def proxy(fresh_database_url) -> Iterator[TcpProxy]:
    address = sa.make_url(fresh_database_url)
    with TcpProxy(address.host or "127.0.0.1", address.port or 5432) as proxy:
        yield proxy


@pytest.fixture
def production(environment, fresh_database_url, proxy) -> dict:
    """Production settings, the database migrated as production does it (`flask db upgrade` first, directly), and
    the app's DATABASE_URL through the proxy. One user's traffic goes past the default rate limit: limits off,
    and no Redis (not under test here)."""
    settings = environment | {k: v for k, v in PRODUCTION.items() if k != "RATELIMIT_STORAGE_URI"}
    settings |= {
        "RATELIMIT_ENABLED": "false",
        "ADMIN_PASSWORD": "ops-password-1",
        "DB_CONNECT_TIMEOUT": str(CONNECT_TIMEOUT),
        "DB_STATEMENT_TIMEOUT": str(STATEMENT_TIMEOUT * 1000),
    }
    upgrade = subprocess.run(
        [sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, env=settings, capture_output=True, timeout=120
    )
    assert upgrade.returncode == 0, upgrade.stderr.decode()
    through_proxy = sa.make_url(fresh_database_url).set(port=proxy.port).render_as_string(hide_password=False)
    return settings | {"DATABASE_URL": through_proxy}


@dataclass
class Outage:
    """What the traffic, the health checks and gunicorn's processes showed around one outage."""

    answers: list[Answer]
    began: float
    restored: float
    recovered: float | None
    last_checks: list[Answer]
    health: Answer
    ready: Answer
    processes_before: tuple[int, set[int]]
    processes_after: tuple[int | None, set[int]]


RECOVERY_CHECKS = ("/api/tasks?per_page=1", "/api/health", "/api/health/ready")


def live_through_outage(server, proxy: TcpProxy, begin: Callable[[], None], seconds: float) -> Outage:
    """Traffic (creates and lists) before, during and after an outage of ``seconds``; health checks meanwhile."""
    token, admin_id = admin_session(server, "ops-password-1")
    master = server.process.pid
    before = wait_for_workers(master, lambda pids: len(pids) == WORKERS)

    def create_or_list(rng: random.Random) -> Answer:
        if rng.random() < 0.5:
            return send(server, "POST", "/api/tasks", new_task(admin_id), token)
        return send(server, "GET", "/api/tasks?per_page=5", token=token)

    with Traffic(4, create_or_list) as traffic, ThreadPoolExecutor(max_workers=2) as probes:
        traffic.wait_for(lambda answers: len(acknowledged(answers)) >= 10)
        assert proxy.live_connections >= 1  # the workers' pooled connections go through the proxy
        begin()
        began = time.monotonic()
        time.sleep(1)
        health = probes.submit(send, server, "GET", "/api/health")
        ready = probes.submit(send, server, "GET", "/api/health/ready")
        time.sleep(max(0.0, began + seconds - time.monotonic()))
        proxy.restore()
        restored = time.monotonic()
        recovered = None
        while recovered is None and time.monotonic() < restored + RECOVERY_BOUND:
            checks = [send(server, "GET", path, token=token) for path in RECOVERY_CHECKS]
            if all(check.status == 200 for check in checks):
                recovered = time.monotonic()
            else:
                time.sleep(0.2)
        time.sleep(1.5)  # traffic after the recovery
        health, ready = health.result(), ready.result()
    after = workers_of(master)
    return Outage(
        answers=traffic.answers,
        began=began,
        restored=restored,
        recovered=recovered,
        last_checks=checks,
        health=health,
        ready=ready,
        processes_before=(master, before),
        processes_after=(master if server.process.poll() is None else None, after),
    )


@pytest.mark.parametrize(
    ("outage", "seconds"),
    [
        # The server is gone: connections drop, new ones are refused.
        ("cut", 3),
        # The server's end stays open and silent (a hung server, a pooler whose server is gone): only the app's
        # own timeouts end a wait. Longer than a request may take, so that one that hangs shows before the end.
        ("blackhole", REQUEST_BOUND + 2),
    ],
    ids=["cut", "blackhole"],
)
def test_requests_answer_503_promptly_while_the_database_is_away_and_succeed_again_once_it_returns(
    servers, production, proxy, fresh_database_url, outage, seconds
):
    server = servers.start(GUNICORN, production)

    seen = live_through_outage(server, proxy, getattr(proxy, outage), seconds)

    slow = [answer for answer in seen.answers if answer.status is None or answer.elapsed > REQUEST_BOUND]
    assert not slow, f"no answer within {REQUEST_BOUND}s: {slow[:5]}"
    wrong = [answer for answer in seen.answers if not (succeeded(answer) or unavailable(answer))]
    assert not wrong, f"neither a success nor a 503 in the error envelope: {wrong[:5]}"
    during = [answer for answer in seen.answers if answer.started >= seen.began and answer.ended <= seen.restored]
    assert during, "no request was answered during the outage"
    assert all(unavailable(answer) for answer in during), [answer for answer in during if not unavailable(answer)]
    assert health_unavailable(seen.health) and seen.health.elapsed <= REQUEST_BOUND, seen.health
    assert health_unavailable(seen.ready) and seen.ready.elapsed <= REQUEST_BOUND, seen.ready

    assert seen.recovered is not None, f"not recovered {RECOVERY_BOUND}s after the return: {seen.last_checks}"
    afterwards = [answer for answer in seen.answers if answer.started >= seen.recovered]
    assert afterwards and all(succeeded(answer) for answer in afterwards), afterwards[:5]
    assert seen.processes_after == seen.processes_before  # recovered by itself: no worker restarted

    stored = {str(row.id) for row in database_rows(fresh_database_url, Task.__table__)}
    lost = [answer for answer in acknowledged(seen.answers) if answer.body["task"]["id"] not in stored]
    assert not lost, f"{len(lost)} tasks answered 201 are not in the database: {lost[:3]}"
    server.stop()
    assert "Traceback" not in server.log.read_text()


# A worker is killed; the server is told to stop --------------------------------------------------------------


EACH_DATABASE = pytest.mark.parametrize("fresh_database_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def development(environment) -> dict:
    """The development server (it migrates and creates the admin at start); limits off, as one user's traffic
    goes past them."""
    return environment | {"RATELIMIT_ENABLED": "false"}


def sqlite_path(url: str) -> str:
    return sa.make_url(url).database


def open_files(pid: int) -> list[str]:
    """What the process's file descriptors point at: paths, or "socket:[inode]"."""
    targets = []
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                targets.append(os.readlink(fd))
            except OSError:
                continue  # closed meanwhile
    except OSError:
        pass  # the process ended
    return targets


def sockets(local_port: int, established: bool = False) -> set[str]:
    """This machine's IPv4 TCP sockets on ``local_port``, as a process's fd shows them ("socket:[inode]"), from
    /proc/net/tcp; ``established``: connections only (state 01), and once accepted (a connection still waiting
    in the listen queue has inode 0)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rpartition(":")[2], 16) == local_port and (not established or fields[3] == "01"):
            found.add(f"socket:[{fields[9]}]")
    return found - {"socket:[0]"}


@contextmanager
def writes_held_halfway(database_url: str) -> Iterator[None]:
    """Until the block ends, every write stops in the middle of its transaction. On PostgreSQL, the table of kept
    counts is locked: a write's trigger waits, after the task rows are written and before the counts are. On
    SQLite, a reader holds its shared lock: a writer's COMMIT waits, its changes made but not in the file."""
    if database_url.startswith("sqlite"):
        reader = sqlite3.connect(sqlite_path(database_url), isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM tasks").fetchall()
            yield
        finally:
            reader.execute("ROLLBACK")
            reader.close()
        return
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("LOCK TABLE task_counts IN SHARE MODE"))
            yield
            connection.rollback()
    finally:
        engine.dispose()


def worker_halfway_through_a_write(database_url: str, workers: set[int], timeout: float = 10) -> int:
    """The worker whose write is held halfway: on SQLite the one with the rollback journal open (the writer), on
    PostgreSQL the one whose connection's backend waits for the lock."""
    engine = None if database_url.startswith("sqlite") else sa.create_engine(database_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if engine is None:
                journal = sqlite_path(database_url) + "-journal"
                holders = [pid for pid in workers if journal in open_files(pid)]
            else:
                with engine.connect() as connection:
                    waiting = connection.execute(
                        sa.text(
                            "SELECT client_port FROM pg_stat_activity "
                            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                        )
                    ).scalars()
                    held = {socket for port in waiting for socket in sockets(port)}
                holders = [pid for pid in workers if held.intersection(open_files(pid))]
            if holders:
                return holders[0]
            time.sleep(0.05)
    finally:
        if engine is not None:
            engine.dispose()
    pytest.fail(f"no worker was caught halfway through a write within {timeout}s")


@EACH_DATABASE
def test_a_worker_killed_halfway_through_a_write_is_replaced_the_others_answer_and_no_task_is_half_written(
    servers, development, fresh_database_url
):
    server = servers.start(GUNICORN, development)
    token, admin_id = admin_session(server, "admin123")
    master = server.process.pid
    workers = wait_for_workers(master, lambda pids: len(pids) == WORKERS)
    ids = []
    for _ in range(30):
        answer = send(server, "POST", "/api/tasks", new_task(admin_id), token)
        assert answer.status == 201, answer
        ids.append(answer.body["task"]["id"])
    seeded = len(ids)

    def write(rng: random.Random) -> Answer:
        kind = rng.choice(("create", "create", "edit", "status", "bulk"))
        if kind == "create":
            answer = send(server, "POST", "/api/tasks", new_task(admin_id), token)
            if answer.status == 201:
                ids.append(answer.body["task"]["id"])
            return answer
        status = {"status": rng.choice(TASK_STATUSES)}
        if kind == "edit":
            return send(server, "PUT", f"/api/tasks/{rng.choice(ids)}", {"note": f"edited {rng.random()}"}, token)
        if kind == "status":
            return send(server, "PATCH", f"/api/tasks/{rng.choice(ids)}/status", status, token)
        return send(server, "PATCH", "/api/tasks/bulk-status", {"task_ids": rng.sample(ids, 20)} | status, token)

    with Traffic(4, write) as traffic:
        traffic.wait_for(lambda answers: len(answers) >= 20)
        with writes_held_halfway(fresh_database_url):
            victim = worker_halfway_through_a_write(fresh_database_url, workers)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
        replaced = wait_for_workers(master, lambda pids: len(pids) == WORKERS and victim not in pids)
        since = time.monotonic()
        traffic.wait_for(lambda answers: sum(a.started > since and succeeded(a) for a in answers) >= 20)

    assert len(replaced - workers) == 1, (workers, replaced)  # one new worker in place of the killed one
    # The killed worker's request (the one held halfway) ends without an answer; every other request succeeds.
    # Except on SQLite, whose write lock is no queue: a request that waited behind the killed one may lose the race
    # for it until its 5 s busy wait runs out, and answer 503 in the error envelope; once the worker is replaced,
    # none may.
    unanswered = [answer for answer in traffic.answers if answer.status is None]
    assert len(unanswered) == 1 and unanswered[0].started < killed, unanswered[:5]
    assert isinstance(unanswered[0].body, ConnectionError | http.client.HTTPException), repr(unanswered[0].body)
    failed = [answer for answer in traffic.answers if answer.status is not None and not succeeded(answer)]
    if fresh_database_url.startswith("sqlite"):
        failed = [answer for answer in failed if not (unavailable(answer) and answer.started < since)]
    assert not failed, failed[:5]

    rows = {str(row.id): row for row in database_rows(fresh_database_url, Task.__table__)}
    created = acknowledged(traffic.answers)
    assert len(rows) == seeded + len(created)  # a create held halfway is not there: its transaction rolled back
    for answer in created:
        row = rows[answer.body["task"]["id"]]
        assert (row.entity_name, row.task_type) == (answer.sent["entity_name"], answer.sent["task_type"]), row
    for row in rows.values():
        assert row.status in TASK_STATUSES and row.entity_name.startswith("Entity ") and row.task_time, row
        assert str(row.created_by_id) == str(row.contact_person_id) == admin_id, row
        assert row.date_created <= row.updated_at, row
    engine = sa.create_engine(fresh_database_url)
    with engine.connect() as connection:
        kept, recounted = kept_and_recounted(connection)
    engine.dispose()
    assert kept == recounted
    server.stop()
    assert "Traceback" not in server.log.read_text()


@contextmanager
def task_locked(database_url: str, task_id: str) -> Iterator[None]:
    """Edits of the task wait until the block ends: its row locked on PostgreSQL, the write lock held on SQLite
    (where writers wait up to five seconds: keep the block shorter)."""
    if database_url.startswith("sqlite"):
        holder = sqlite3.connect(sqlite_path(database_url), isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            connection.execute(sa.select(Task.id).where(Task.id == uuid.UUID(task_id)).with_for_update())
            yield
            connection.rollback()
    finally:
        engine.dispose()


def accepted_by_a_worker(port: int, master: int) -> bool:
    """Has one of the master's workers accepted a connection on ``port`` (so holds its socket)?"""
    connections = sockets(port, established=True)
    return any(connections.intersection(open_files(pid)) for pid in workers_of(master))


def connection_refused(port: int, within: float) -> str:
    """Connect to the port until a connection is refused: "refused", or what happened instead."""
    deadline = time.monotonic() + within
    outcome = "no attempt"
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            outcome = "accepted"
        except ConnectionRefusedError:
            return "refused"
        except OSError as error:
            outcome = repr(error)
        time.sleep(0.05)
    return outcome


@EACH_DATABASE
def test_sigterm_lets_the_request_in_flight_finish_refuses_new_connections_and_exits(
    servers, development, fresh_database_url
):
    server = servers.start(GUNICORN, development)
    token, admin_id = admin_session(server, "admin123")
    task_id = send(server, "POST", "/api/tasks", new_task(admin_id), token).body["task"]["id"]
    master = server.process.pid
    edit = {"note": "finished after SIGTERM"}

    with ThreadPoolExecutor(max_workers=1) as pool:
        with task_locked(fresh_database_url, task_id):
            in_flight = pool.submit(send, server, "PUT", f"/api/tasks/{task_id}", edit, token)
            deadline = time.monotonic() + 10
            while not accepted_by_a_worker(server.port, master):
                assert time.monotonic() < deadline, "no worker took the request"
                time.sleep(0.02)
            time.sleep(0.2)
            assert not in_flight.done(), in_flight.result()  # a worker has it, and it waits for the lock
            server.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            new_connection = connection_refused(server.port, within=2)
            finished_early = in_flight.done()
        answer = in_flight.result()
    with suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=GRACEFUL_TIMEOUT + 5)
    exited = time.monotonic()

    assert answer.status == 200 and answer.body["task"]["note"] == edit["note"], answer
    assert {str(row.id): row.note for row in database_rows(fresh_database_url, Task.__table__)}[task_id] == edit["note"]
    assert server.process.returncode == 0, server.log.read_text()[-3000:]
    assert exited - signalled < GRACEFUL_TIMEOUT
    assert "Traceback" not in server.log.read_text()
    assert not finished_early
    assert new_connection == "refused", f"a new connection after SIGTERM was {new_connection}, not refused"


def app_through(proxy: TcpProxy, fresh_database_url: str, tmp_path) -> Flask:
    through_proxy = sa.make_url(fresh_database_url).set(port=proxy.port).render_as_string(hide_password=False)
    return create_app(settings(through_proxy, tmp_path))


def test_a_pooled_connection_idle_a_while_is_checked_and_replaced_before_use(
    proxy, fresh_database_url, tmp_path, monkeypatch
):
    app = app_through(proxy, fresh_database_url, tmp_path)
    client = app.test_client()
    assert client.get("/api/health").status_code == 200
    proxy.cut()  # the pooled connection dies; the database comes back
    proxy.restore()

    monkeypatch.setattr(config, "PING_IDLE_AFTER", 0)  # idle long enough to be checked

    assert client.get("/api/health").status_code == 200
    with app.app_context():
        db.engine.dispose()


def test_a_pooled_connection_used_moments_ago_is_trusted_and_its_failure_renews_the_pool(
    proxy, fresh_database_url, tmp_path
):
    """No round trip to check a connection used within PING_IDLE_AFTER: if the database went away meanwhile, the
    one request on it answers 503, and the pool connects afresh for the next."""
    app = app_through(proxy, fresh_database_url, tmp_path)
    client = app.test_client()
    assert [client.get("/api/health").status_code for _ in range(2)] == [200] * 2
    proxy.cut()
    proxy.restore()

    assert [client.get("/api/health").status_code for _ in range(2)] == [503, 200]
    with app.app_context():
        db.engine.dispose()


def test_the_pool_gauge_stays_true_through_an_outage(proxy, fresh_database_url, tmp_path):
    app = app_through(proxy, fresh_database_url, tmp_path)
    client = app.test_client()
    assert client.get("/api/health").status_code == 200

    proxy.cut()
    # The pooled connection fails at its statement (it was used moments ago: no check first), then each reconnect.
    assert [client.get("/api/health").status_code for _ in range(3)] == [503] * 3
    proxy.restore()
    assert client.get("/api/health").status_code == 200

    page = client.get("/metrics").get_data(as_text=True)
    assert "finstack_db_pool_connections_in_use 0.0" in page.splitlines(), page
    with app.app_context():
        db.engine.dispose()


def test_a_migration_waits_for_another_instances_past_the_statement_timeout(fresh_database_url, tmp_path):
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DATABASE_URL": fresh_database_url,
                   "INSTANCE_PATH": str(tmp_path / "instance"), "FLASK_SKIP_DOTENV": "1",
                   "DB_STATEMENT_TIMEOUT": "500"}  # fmt: skip
    other_instance = sa.create_engine(normalise_database_url(fresh_database_url))
    with other_instance.connect() as connection:
        connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        upgrade = subprocess.Popen(
            [sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, env=environment, stderr=subprocess.PIPE
        )
        time.sleep(3)  # six statement timeouts: it must still be waiting, not cancelled
        assert upgrade.poll() is None, upgrade.stderr.read().decode()
        connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
        _, errors = upgrade.communicate(timeout=120)
    other_instance.dispose()

    assert upgrade.returncode == 0, errors.decode()
