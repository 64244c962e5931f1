"""gunicorn settings for FinStack Tasks, read by `gunicorn app:app` when started from this folder.

Chosen by measurement on a 2-core machine with PostgreSQL and Redis beside it (`make bench
BENCH_ARGS=--compare-workers`, figures in bench/workers.md and the README's "Serving"): a request is a few
milliseconds of Python around sub-millisecond SQL, so it is CPU-bound, and one process per core serves the most.
Two sync workers served 459 requests/s to 16 clients with a p99 of 56 ms; gthread workers (2 x 2 threads) as many
requests, with twice the tail (p99 104 ms), and three or more processes only competed for the two cores.
The environment overrides each choice: WEB_CONCURRENCY (workers), GUNICORN_THREADS, GUNICORN_TIMEOUT. gunicorn
honours $PORT for the address (0.0.0.0:$PORT, as Render needs); command-line options win over this file.
"""

import atexit
import errno
import os
import shutil
import socket
import tempfile
from contextlib import suppress
from pathlib import Path

import gunicorn.sock


def setting(name: str, default: int, low: int, high: int) -> int:
    value = os.environ.get(name) or str(default)
    if not (value.isascii() and value.isdigit() and low <= int(value) <= high):
        raise SystemExit(f"{name} must be a whole number from {low} to {high}, not {value!r}.")
    return int(value)


workers = setting("WEB_CONCURRENCY", 2, 1, 64)
threads = setting("GUNICORN_THREADS", 1, 1, 64)
worker_class = "gthread" if threads > 1 else "sync"
# Each thread holds at most one database connection: workers x threads x instances must stay below
# PostgreSQL's max_connections (about 100 on Render's smallest plans).
os.environ.setdefault("DB_POOL_SIZE", str(threads))

# For gthread workers (GUNICORN_THREADS > 1): connections stay open between requests. Sync workers close each one.
keepalive = 5
timeout = setting("GUNICORN_TIMEOUT", 30, 5, 600)  # a worker silent this long is killed and replaced
graceful_timeout = 30  # on SIGTERM, requests in flight get this long to finish

# Load the app once in the master: start-up work (migrations in development, the first admin) runs once, and
# workers share its memory. Connections the master opened are dropped in each worker below.
preload_app = True
# Recycle workers now and then, so a slow leak in any library cannot grow without bound.
max_requests = 20_000
max_requests_jitter = 2_000

control_socket_disable = True  # gunicorn 27's control socket is not used here, and HOME may be read-only

# Prometheus metrics: every worker writes its figures to files in one folder, and /metrics on any worker sums
# them up. Set here, before the app (and prometheus_client) is loaded; a folder of our own unless one is given,
# removed when the master exits, however it exits (a start that fails included), and never by a worker.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="finstack-metrics-")
    atexit.register(
        lambda master, folder: os.getpid() == master and shutil.rmtree(folder, ignore_errors=True),
        os.getpid(),
        os.environ["PROMETHEUS_MULTIPROC_DIR"],
    )


def on_starting(server):
    """Figures left by an earlier run in a given folder would be counted again: start from none."""
    for leftover in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        leftover.unlink()


def child_exit(server, worker):
    """A worker that exited no longer counts in the live gauges (connections in use)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def when_ready(server):
    """The master serves no request: close the connections its start-up work opened."""
    from app import app
    from models import db

    with app.app_context():
        db.engine.dispose()


def post_fork(server, worker):
    """A forked worker must not share the master's database connections: open its own; and no wait on
    PostgreSQL may outlast its timeouts, even when the server answers nothing (config.limit_postgresql_waits)."""
    from app import app
    from config import limit_postgresql_waits
    from models import db

    with app.app_context():
        db.engine.dispose(close=False)
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql"):
        limit_postgresql_waits(app.config["DB_CONNECT_TIMEOUT"], app.config["DB_STATEMENT_TIMEOUT"])


def post_worker_init(worker):
    """A worker that finds the listening socket shut down (below) is being stopped: it leaves its loop quietly
    (accept() says EINVAL) instead of with a traceback. A long response that makes progress keeps the worker's
    heartbeat going (routes.still_working), so that only a worker that is really stuck is killed after timeout."""
    import routes

    routes.heartbeat = worker.notify
    accept = worker.accept

    def accept_until_shut_down(*args):
        try:
            return accept(*args)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            worker.alive = False
            return None

    worker.accept = accept_until_shut_down


def close_listeners(listeners, unlink=True):
    """On SIGTERM the master closes its listening sockets, but every worker holds a copy until it exits: a
    worker busy with a long request would keep the port accepting connections it never serves. Shutting the
    sockets down stops listening for all processes at once, so new connections are refused while the requests
    in flight finish. Not when a re-executed master takes the sockets over (then ``unlink`` is false)."""
    if unlink:
        for listener in listeners:
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
    close_sockets(listeners, unlink)


close_sockets = gunicorn.sock.close_sockets
gunicorn.sock.close_sockets = close_listeners  # what the master's stop() calls (gunicorn 27)
