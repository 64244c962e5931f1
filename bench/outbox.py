"""The outbox's figures (issue 15), on PostgreSQL, Redis and a local SMTP sink: what queueing an email adds to the
write that queues it (p50, in-process), and how fast 2 Celery workers drain 10,000 queued emails.

    .venv/bin/python bench/outbox.py [--messages 10000] [--workers 2]

1. Writes: a database of its own (bench_outbox, made afresh), migrated as production is. 2 x MESSAGES transactions
   in turn: one inserts a task and commits; the other inserts a task, queues a password-reset email for it
   (outbox.add) and commits, after which the app's hand-over thread publishes the id to Redis, as a request's commit
   does. The difference of the two medians is the outbox's cost on the request. No worker runs meanwhile.
2. Draining: 2 worker processes (`celery -A celery_app worker --concurrency 1`, as many as --workers) start and send
   every message to an aiosmtpd sink that accepts everything; the clock runs from their start to the last message
   marked sent. The sink counts distinct Message-IDs: a message sent twice would show.

Writes bench/outbox.md. Not a test: figures vary by machine; rerun it to compare."""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from email import message_from_bytes
from pathlib import Path

import psycopg2
from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SERVER_URL = "postgresql://postgres@127.0.0.1:5432"
DATABASE = "bench_outbox"


class Sink:
    """An SMTP server's handler that takes every message and keeps its Message-ID."""

    def __init__(self):
        self.message_ids: list[str] = []

    async def handle_DATA(self, _server, _session, envelope) -> str:
        self.message_ids.append(message_from_bytes(envelope.content)["Message-ID"])
        return "250 2.0.0 OK"


def fresh_database() -> str:
    connection = psycopg2.connect(f"{SERVER_URL}/postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        cursor.execute(f"CREATE DATABASE {DATABASE}")
    connection.close()
    return f"{SERVER_URL}/{DATABASE}"


def timed_writes(app, messages: int) -> tuple[list[float], list[float]]:
    """Milliseconds per transaction without and with an email queued, interleaved so both see the same machine."""
    import outbox
    from models import Task, User, db, utcnow

    with app.app_context():
        user = User(username="bench", email="bench@example.com", full_name="Bench Mark", password_hash="x")
        db.session.add(user)
        db.session.commit()
        plain, with_email = [], []
        for number in range(2 * messages):
            started = time.perf_counter()
            task = Task(
                id=uuid.uuid4(), entity_name="ABC Corporation", task_type="Call", task_time=utcnow(),
                created_by_id=user.id,
            )  # fmt: skip
            db.session.add(task)
            if number % 2:
                payload = {"full_name": "Bench Mark", "link": "http://localhost:4200/reset", "expires_in": "1 hour"}
                outbox.add("password_reset", f"person{number}@example.com", f"bench:{task.id}", payload, utcnow())
            db.session.commit()
            (with_email if number % 2 else plain).append((time.perf_counter() - started) * 1000)
        app.extensions["jobs"].wait()  # every id handed to Redis
    return plain, with_email


def drain(environment: dict, workers: int, messages: int, database_url: str) -> float:
    """Seconds from starting the workers until every message is marked sent."""
    command = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--concurrency", "1", "--loglevel",
               "WARNING", "--without-gossip", "--without-mingle"]  # fmt: skip
    connection = psycopg2.connect(database_url)
    connection.autocommit = True
    started = time.perf_counter()
    processes = [
        subprocess.Popen([*command, "--hostname", f"bench{n}@%h"], cwd=ROOT, env=environment) for n in range(workers)
    ]
    try:
        while True:
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM outbox_messages WHERE state = 'sent'")
                if cursor.fetchone()[0] >= messages:
                    return time.perf_counter() - started
            time.sleep(0.05)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    sink = Sink()
    with socket.socket() as probe:  # aiosmtpd cannot listen on port 0: a free port first
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    instance = tempfile.mkdtemp(prefix="bench-outbox-")
    database_url = fresh_database()
    environment = os.environ | {
        "DATABASE_URL": database_url,
        "INSTANCE_PATH": instance,
        "FLASK_SKIP_DOTENV": "1",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
        "CELERY_QUEUE": f"bench-outbox-{uuid.uuid4().hex}",  # nothing of another run's, or of the tests'
        "MAIL_BACKEND": "smtp",
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": str(port),
        "MAIL_SECURITY": "none",
        "MAIL_FROM": "tasks@example.com",
        "LOG_LEVEL": "WARNING",
        "RATELIMIT_ENABLED": "false",
        "METRICS_ENABLED": "false",
    }
    flask = [sys.executable, "-m", "flask", "--app", "app", "db", "upgrade"]
    subprocess.run(flask, cwd=ROOT, env=environment, check=True, capture_output=True)
    os.environ.update(environment)
    from app import create_app

    app = create_app()
    plain, with_email = timed_writes(app, args.messages)
    seconds = drain(environment, args.workers, args.messages, database_url)
    controller.stop()

    added = statistics.median(with_email) - statistics.median(plain)
    distinct = len(set(sink.message_ids))
    rate = args.messages / seconds
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report = f"""# Outbox benchmark

Written by `bench/outbox.py` on {stamp} at commit {commit.strip()} ({os.cpu_count()} cores; PostgreSQL, Redis, the
SMTP sink and the workers all on this machine). How it measures: the script's docstring.

| Figure | Measured | Target |
|---|--:|--:|
| A write's transaction, p50 (insert a task, commit) | {statistics.median(plain):.3f} ms | |
| The same with an email queued (outbox.add, hand-over after commit) | {statistics.median(with_email):.3f} ms | |
| Added by the outbox, p50 | {added:.3f} ms | under 0.5 ms |
| {args.messages:,} emails drained by {args.workers} workers | {seconds:.1f} s, {rate:,.0f} messages/s | |
| Received by the SMTP sink | {len(sink.message_ids):,}, {distinct:,} distinct Message-IDs | each once |
"""
    (ROOT / "bench" / "outbox.md").write_text(report)
    print(report)
    if distinct != args.messages or len(sink.message_ids) != args.messages:
        sys.exit("Some message was lost or sent twice: see above.")


if __name__ == "__main__":
    main()
