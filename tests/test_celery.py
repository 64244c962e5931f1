"""Background work on Celery with the real Redis broker and real workers (celery's own test worker in a thread, and
`celery -A celery_app worker` processes): a commit's messages reach a worker and go out once; two workers draining
one outbox send each message once; with the broker down at commit time nothing is lost (the sweep sends it); a
worker killed (SIGKILL) in the middle of a send leaves its message to the sweep, which sends it once. And without a
broker, the embedded runner sends after the commit, in the app's own process."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from smtp_server import SmtpServer

import jobs
import outbox
from config import celery_settings
from helpers import REDIS_URL, free_port
from models import OutboxMessage, db, utcnow

ROOT = Path(__file__).resolve().parent.parent
QUEUE = f"finstack-test-{uuid.uuid4().hex}"  # this run's own: the SQLite and PostgreSQL runs share the Redis
RESET = {"full_name": "Alice Adams", "link": "https://tasks.example.com/reset?token=t", "expires_in": "1 hour"}
ON_CELERY = pytest.mark.app_config(CELERY=celery_settings(REDIS_URL, QUEUE), JOBS_AFTER_COMMIT=True)

pytestmark = pytest.mark.own_database  # the workers read what the test's commits wrote


@pytest.fixture(autouse=True)
def empty_queue():
    yield
    store = redis.Redis.from_url(REDIS_URL)
    store.delete(QUEUE, f"{QUEUE}\x06\x163", f"{QUEUE}\x06\x166", f"{QUEUE}\x06\x169")  # and kombu's priority lists
    store.close()


@pytest.fixture
def smtp(app):
    with SmtpServer() as server:
        app.config.update(MAIL_BACKEND="smtp", MAIL_SERVER="127.0.0.1", MAIL_PORT=server.port, MAIL_SECURITY="none")
        yield server


@pytest.fixture
def worker(app):
    """Celery's own test worker, in a thread of this process, on the app's Celery app (solo pool)."""
    with start_worker(app.extensions["celery"], pool="solo", perform_ping_check=False, shutdown_timeout=10):
        yield


def queue(app, count: int = 1) -> list:
    """Queue ``count`` messages in one transaction and commit: the ids."""
    with app.app_context():
        ids = [outbox.add("password_reset", f"user{n}@example.com", f"test:{n}", RESET, utcnow()) for n in range(count)]
        db.session.commit()
        return ids


def states(app, ids) -> list[str]:
    with app.app_context():
        db.session.expire_all()
        return [db.session.get(OutboxMessage, message_id).state for message_id in ids]


def eventually(condition, timeout: float = 30) -> None:
    """Until ``condition()`` holds: the workers' progress, which nothing tells this test of."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s")
        time.sleep(0.05)


@ON_CELERY
def test_a_commit_hands_its_messages_to_a_worker_which_sends_each_once(app, smtp, worker):
    ids = queue(app, 3)

    eventually(lambda: states(app, ids) == ["sent"] * 3)
    assert sorted(received.rcpt_tos[0] for received in smtp.received) == [f"user{n}@example.com" for n in range(3)]


@ON_CELERY
def test_the_sweep_leaves_a_message_the_broker_holds_to_the_workers(app, monkeypatch):
    ids = queue(app, 2)  # handed to the broker by the commit; no worker is running
    app.extensions["jobs"].wait()
    handed = []

    with app.app_context(), redis.Redis.from_url(REDIS_URL) as broker:
        assert jobs.sweep(send=handed.append) == 0  # a backlog is not queued a second time
        assert broker.llen(QUEUE) == 2
        later = utcnow() + outbox.HAND_OVER_AGAIN_AFTER
        monkeypatch.setattr(jobs, "utcnow", lambda: later)
        assert jobs.sweep(send=handed.append) == 2  # unless the broker has held them too long (or lost them)
    assert sorted(handed) == sorted(ids)


@pytest.mark.app_config(CELERY=celery_settings(f"redis://127.0.0.1:{free_port()}/0", QUEUE), JOBS_AFTER_COMMIT=True)
def test_with_the_broker_down_at_commit_time_the_sweep_sends_the_message(app, smtp):
    [message_id] = queue(app)  # nothing listens where the broker should be: the commit stands all the same
    app.extensions["jobs"].wait()

    assert states(app, [message_id]) == ["pending"]
    with app.app_context():
        assert jobs.sweep() == 1
    assert states(app, [message_id]) == ["sent"]
    assert len(smtp.received) == 1


@ON_CELERY
def test_the_sweep_task_hands_every_due_message_to_the_workers(app, smtp, worker):
    with app.app_context():  # queued where nothing publishes at commit (JOBS_AFTER_COMMIT off)
        app.config["JOBS_AFTER_COMMIT"] = False
        ids = queue(app, 2)
    assert states(app, ids) == ["pending", "pending"]

    jobs.sweep_outbox_task.apply_async()

    eventually(lambda: states(app, ids) == ["sent", "sent"])
    assert len(smtp.received) == 2


def start_worker_process(app, tmp_path: Path, name: str, mail_port: int) -> subprocess.Popen:
    """`celery -A celery_app worker`, as production starts it, on the test's database, broker queue and SMTP port."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "DATABASE_URL": app.config["SQLALCHEMY_DATABASE_URI"],
        "INSTANCE_PATH": app.instance_path,
        "SECRET_KEY": app.config["SECRET_KEY"],
        "JWT_SECRET_KEY": app.config["JWT_SECRET_KEY"],
        "CELERY_BROKER_URL": REDIS_URL,
        "CELERY_QUEUE": QUEUE,
        "MAIL_BACKEND": "smtp",
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": str(mail_port),
        "MAIL_SECURITY": "none",
        "MAIL_TIMEOUT": "60",
        "LOG_LEVEL": "WARNING",
        "FLASK_SKIP_DOTENV": "1",
    }
    command = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool", "prefork", "--concurrency", "1"]
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(
        [*command, "--hostname", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def stop(process: subprocess.Popen) -> None:
    """A warm shutdown, as a deploy stops a worker: its main process is told, and stops its pool itself."""
    if process.poll() is None:
        process.terminate()
    process.wait(30)


def kill(process: subprocess.Popen) -> None:
    """SIGKILL for the worker and its pool's processes at once: no chance to finish or clean up anything."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


@ON_CELERY
def test_two_workers_draining_one_outbox_send_each_message_once(app, smtp, tmp_path):
    workers = [start_worker_process(app, tmp_path, f"w{n}", smtp.port) for n in (1, 2)]
    try:
        ids = queue(app, 60)
        with app.app_context():
            jobs.sweep_outbox_task.apply()  # and each is handed over a second time, as a sweep racing the commit
        eventually(lambda: states(app, ids) == ["sent"] * 60, timeout=60)
    finally:
        for process in workers:
            stop(process)

    recipients = [received.rcpt_tos[0] for received in smtp.received]
    assert sorted(recipients) == sorted(f"user{n}@example.com" for n in range(60))  # each once
    for n in (1, 2):
        assert "Traceback" not in (tmp_path / f"w{n}.log").read_text()


@ON_CELERY
def test_a_worker_killed_in_the_middle_of_a_send_leaves_the_message_to_the_sweep(app, smtp, tmp_path, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts the connection, never greets: a send hangs
        process = start_worker_process(app, tmp_path, "doomed", silent.getsockname()[1])
        try:
            [message_id] = queue(app)
            eventually(lambda: states(app, [message_id]) == ["sending"], timeout=60)
            silent.settimeout(30)
            connection, _ = silent.accept()  # the worker is in the middle of its SMTP exchange
        finally:
            kill(process)
        connection.close()

    assert states(app, [message_id]) == ["sending"]  # claimed, never marked
    with app.app_context():
        assert jobs.sweep() == 0  # its lease holds it: nobody sends it twice meanwhile
        monkeypatch.setattr(jobs, "utcnow", lambda: utcnow() + outbox.LEASE + timedelta(seconds=1))
        assert jobs.sweep() == 1  # its lease has run out
    assert states(app, [message_id]) == ["sent"]
    assert [received.rcpt_tos for received in smtp.received] == [["user0@example.com"]]


def test_without_a_broker_the_app_sends_after_the_commit_in_a_thread_of_its_own(app, mailbox):
    app.config["JOBS_AFTER_COMMIT"] = True
    assert isinstance(app.extensions["jobs"], jobs.EmbeddedRunner)
    ids = queue(app, 2)
    app.extensions["jobs"].wait()

    assert states(app, ids) == ["sent", "sent"]
    assert sorted(message["To"] for message in mailbox.deliver()) == ["user0@example.com", "user1@example.com"]


def test_a_rolled_back_transaction_hands_nothing_over(app):
    app.config["JOBS_AFTER_COMMIT"] = True
    with app.app_context():
        outbox.add("password_reset", "alice@example.com", "test:rolled-back", RESET, utcnow())
        db.session.rollback()
        assert outbox.QUEUED not in db.session.info
    assert app.extensions["jobs"].pid is None  # its thread never started: nothing was handed over


def test_celery_tasks_are_registered_under_stable_names(app):
    tasks = app.extensions["celery"].tasks
    assert {"outbox.send", "outbox.sweep"} <= set(tasks)
    assert app.extensions["celery"].conf.beat_schedule["sweep-outbox"] == {
        "task": "outbox.sweep",
        "schedule": jobs.SWEEP_INTERVAL,
    }
