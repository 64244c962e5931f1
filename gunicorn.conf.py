"""gunicorn settings for FinStack Tasks, read by `gunicorn app:app` when started from this folder.

Chosen by measurement on a 2-core machine with PostgreSQL and Redis beside it (`make bench
BENCH_ARGS=--compare-workers`, figures in bench/workers.md and the README's "Serving"): a request is a few
milliseconds of Python around sub-millisecond SQL, so it is CPU-bound, and one process per core serves the most.
Two sync workers served 459 requests/s to 16 clients with a p99 of 56 ms; gthread workers (2 x 2 threads) as many
requests, with twice the tail (p99 104 ms), and three or more processes only competed for the two cores.
But a sync worker reads a request with blocking calls, so two clients that send half a request line stalled the
whole server for 30 s (bench/slowloris.py, figures in bench/slowloris.md). The workers are therefore
BufferingWorker (below): one thread each by default, like a sync worker, and each request read in the worker's
event loop until it has arrived whole, so slow clients cost a socket, not a worker.
The environment overrides each choice: WEB_CONCURRENCY (workers), GUNICORN_THREADS, GUNICORN_TIMEOUT,
GUNICORN_HEAD_TIMEOUT. gunicorn honours $PORT for the address (0.0.0.0:$PORT, as Render needs); command-line options
win over this file.
"""

import atexit
import errno
import json
import os
import re
import selectors
import shutil
import socket
import tempfile
import time
from collections import deque
from contextlib import suppress
from functools import partial
from pathlib import Path

import gunicorn.sock
import gunicorn.util
from gunicorn import http
from gunicorn.workers.gthread import TConn, ThreadWorker


def setting(name: str, default: int, low: int, high: int) -> int:
    value = os.environ.get(name) or str(default)
    if not (value.isascii() and value.isdigit() and low <= int(value) <= high):
        raise SystemExit(f"{name} must be a whole number from {low} to {high}, not {value!r}.")
    return int(value)


workers = setting("WEB_CONCURRENCY", 2, 1, 64)
threads = setting("GUNICORN_THREADS", 1, 1, 64)
# Each thread holds at most one database connection: workers x threads x instances must stay below
# PostgreSQL's max_connections (about 100 on Render's smallest plans).
os.environ.setdefault("DB_POOL_SIZE", str(threads))

# Connections stay open this long between requests (a sync worker, --worker-class sync, closes each one).
keepalive = 5
timeout = setting("GUNICORN_TIMEOUT", 30, 5, 600)  # a worker whose event loop is silent this long is replaced
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
    accept = getattr(worker, "accept", None)  # the sync and gthread workers' (others accept in their own loop)
    if accept is None:
        return

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


# -- Slow clients and gunicorn's own answers ---------------------------------------------------------------------
# A sync worker (or a gthread thread) reads a request with blocking calls: two connections that send half a request
# line and stop held both workers until the 30 s timeout, and with gthread they held threads for good. The worker
# below reads every request head (and a body of up to BUFFERED_BODY bytes) in its event loop, without blocking, and
# hands a thread only a request that has fully arrived; bench/slowloris.md has the measurements behind the choice.
# Seconds for the request line and headers to arrive; then a 408 and the connection is closed.
HEAD_TIMEOUT = setting("GUNICORN_HEAD_TIMEOUT", 10, 1, 300)
BODY_TIMEOUT = 30  # seconds for a body of up to BUFFERED_BODY bytes to arrive, after the head
BUFFERED_BODY = 1024 * 1024 + 1  # the app's MAX_CONTENT_LENGTH (1 MiB), and one byte to tell "too large"
# After an answer sent before the body was read (a 413), the rest of the body is read and dropped, so that the
# client (which sends it all before reading, as urllib does) gets the answer instead of a reset: at most this long
# and this many bytes, in the event loop, so it costs no thread.
DRAIN_TIMEOUT = 10
DRAIN_LIMIT = 64 * 1024 * 1024
EXPECT_CONTINUE = re.compile(rb"\r\nexpect:[ \t]*100-continue", re.IGNORECASE)
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,18})[ \t]*\r\n", re.IGNORECASE)
# The largest head gunicorn accepts: a longer one is handed on as it is, and gunicorn answers 414 or 431.
MAX_HEAD = 4096 + 100 * 8192 + 4


class BufferedConn(TConn):
    """A connection whose request is read without blocking, before a thread is given it."""

    def __init__(self, worker, *args):
        super().__init__(*args)
        self.worker = worker
        self.received = bytearray()
        self.wanted = None  # bytes that make the whole request, once the head is in
        self.ready = False  # handed to a thread
        self.oversized = False  # a body too large to buffer: the connection ends after the answer

    def close(self, graceful=False):
        """A graceful close (after an answer) reads the rest of what the client sends in the event loop."""
        if graceful:
            self.worker.drain(self.sock)
        else:
            super().close()


class BufferingWorker(ThreadWorker):
    """gunicorn's gthread worker, but a request reaches a thread only once its head and its body (up to
    BUFFERED_BODY) have arrived: until then the connection waits in the event loop, at the cost of a socket."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arriving = deque()  # connections whose request is still arriving
        self.draining = deque()  # [deadline, socket, bytes read] of sockets being drained before closing
        self.busy = 0  # requests handed to the threads and not finished

    def set_accept_enabled(self, enabled):
        """Accept only while a thread is free, as a sync worker does: a busy worker leaves new connections to an
        idle one instead of queueing them behind its own (connections already accepted keep arriving meanwhile)."""
        super().set_accept_enabled(enabled and self.busy < self.cfg.threads)

    def finish_request(self, conn, fs):
        self.busy -= 1
        super().finish_request(conn, fs)

    def accept(self, listener):
        if self.cfg.is_ssl:  # TLS is the platform's job here; keep gunicorn's own path for it
            return super().accept(listener)
        try:
            client, address = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return None
        self.nr_conns += 1
        self.receive(BufferedConn(self, self.cfg, client, address, listener.getsockname()))
        return None

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection's next request is read like a new one."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.receive(conn)

    def enqueue_req(self, conn):
        """A thread gets a request that has arrived; bytes a client sent behind its last request (pipelined) are
        read on like a new request, not by a thread that would wait for the rest of it."""
        if not isinstance(conn, BufferedConn) or conn.ready:
            if isinstance(conn, BufferedConn):
                conn.ready = False
            self.busy += 1
            return super().enqueue_req(conn)
        return self.receive(conn, conn.parser.unreader.take_buffered())

    def _keepalive_after(self, conn, keepalive):
        """A body too large to have been buffered ends the connection: its rest is drained in the event loop."""
        return False if getattr(conn, "oversized", False) else super()._keepalive_after(conn, keepalive)

    def receive(self, conn, received=b""):
        conn.sock.setblocking(False)
        conn.received[:] = received
        conn.wanted = None
        conn.oversized = False
        conn.timeout = time.monotonic() + HEAD_TIMEOUT
        self.arriving.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_request_bytes, conn))
        if received:
            self.check_arrived(conn)

    def on_request_bytes(self, conn, client):
        try:
            chunk = client.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client left before its request was whole
            self.stop_receiving(conn)
            self.nr_conns -= 1
            conn.close()
            return
        conn.received += chunk
        self.check_arrived(conn)

    def check_arrived(self, conn):
        if conn.wanted is None:
            end = conn.received.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.received) > MAX_HEAD:
                    self.hand_over(conn)
                return
            length = CONTENT_LENGTH.search(conn.received, 0, end + 2)
            body = int(length.group(1)) if length else 0
            if body > BUFFERED_BODY:  # answered 413 by the app without reading it
                conn.oversized = True
                body = 0
            elif EXPECT_CONTINUE.search(conn.received, 0, end + 2):  # the client sends it once told to continue
                body = 0
            conn.wanted = end + 4 + body
            if len(conn.received) < conn.wanted:
                self.arriving.remove(conn)
                conn.timeout = time.monotonic() + BODY_TIMEOUT
                self.arriving.append(conn)
        if len(conn.received) >= conn.wanted:
            self.hand_over(conn)

    def stop_receiving(self, conn):
        self.poller.unregister(conn.sock)
        self.arriving.remove(conn)

    def hand_over(self, conn):
        """The request is here (or is too large to wait for): a thread parses and serves it from the buffer."""
        self.stop_receiving(conn)
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(conn.received))
        conn.received.clear()
        conn.initialized = conn.data_ready = conn.ready = True
        self.enqueue_req(conn)

    def drain(self, client):
        """Send FIN, then read and drop what the client still sends, without blocking; closed at its end, after
        DRAIN_TIMEOUT or DRAIN_LIMIT bytes, whichever comes first."""
        try:
            client.shutdown(socket.SHUT_WR)
            client.setblocking(False)
        except OSError:
            gunicorn.util.close(client)
            return
        entry = [time.monotonic() + DRAIN_TIMEOUT, client, 0]
        self.draining.append(entry)
        self.poller.register(client, selectors.EVENT_READ, partial(self.on_drain_bytes, entry))

    def on_drain_bytes(self, entry, client):
        try:
            chunk = client.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        entry[2] += len(chunk)
        if not chunk or entry[2] > DRAIN_LIMIT:
            self.draining.remove(entry)
            self.poller.unregister(client)
            gunicorn.util.close(client)

    def murder_pending(self):
        """Also close the connections whose request did not arrive in time (with a 408), and end old drains."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [conn for conn in self.arriving if conn.timeout <= now]:  # head and body deadlines interleave
            self.stop_receiving(conn)
            self.nr_conns -= 1
            with suppress(OSError):
                write_json_error(conn.sock, 408, "Request Timeout", "")
            conn.close()
        while self.draining and self.draining[0][0] <= now:
            _deadline, client, _count = self.draining.popleft()
            with suppress(KeyError, ValueError, OSError):
                self.poller.unregister(client)
            gunicorn.util.close(client)


worker_class = BufferingWorker  # threads (GUNICORN_THREADS) serve requests; one per worker unless set

# gunicorn answers some requests itself, before the app sees them, with an HTML page. The service answers every
# error with its JSON envelope, so the one function gunicorn writes them with (util.write_error, called by the
# workers' handle_error) writes that instead.
GUNICORN_ERRORS = {
    400: "Bad request: the request line or a header is not valid HTTP.",
    403: "Forbidden.",
    408: "The request did not arrive in time: send it whole, without pauses.",
    414: "Request line too long: the limit is 4094 bytes (shorten the URL or its query string).",
    417: "Expectation failed: only 'Expect: 100-continue' is understood.",
    431: "Request headers too large: at most 100 headers of up to 8190 bytes each.",
    501: "Not implemented: the only transfer coding understood is chunked.",
}


def write_json_error(client, status, reason, _message):
    """gunicorn's own error answers, in the service's error envelope (gunicorn's message may echo the request)."""
    body = json.dumps(
        {"error": GUNICORN_ERRORS.get(status, "Internal server error; try again later."), "details": {}}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n"
    )
    gunicorn.util.write_nonblock(client, head.encode("latin-1") + body)


gunicorn.util.write_error = write_json_error
