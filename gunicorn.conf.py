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
import gc
import json
import os
import re
import select
import selectors
import shutil
import socket
import tempfile
import time
from collections import deque
from contextlib import suppress
from functools import partial
from http import HTTPStatus
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
    """The master serves no request: close the connections its start-up work opened. Then the loaded app's objects
    are moved out of the garbage collector's sight (as Python's docs advise before forking): the workers then
    neither copy the pages the collector would touch, nor spend half a second collecting them when they exit."""
    from app import app
    from models import db

    with app.app_context():
        db.engine.dispose()
    gc.freeze()


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
# What it cannot buffer within the limits below it refuses from the event loop (431, 413, 503) rather than wait.
# Seconds for the request line and headers to arrive; then a 408 and the connection is closed.
HEAD_TIMEOUT = setting("GUNICORN_HEAD_TIMEOUT", 10, 1, 300)
# Seconds for a body of up to BUFFERED_BODY bytes to arrive, after the head; also the longest a thread waits on its
# socket for anything (a backstop: a request handed over whole never makes it wait).
BODY_TIMEOUT = 30
BUFFERED_BODY = 1024 * 1024 + 1  # the app's MAX_CONTENT_LENGTH (1 MiB), and one byte to tell "too large"
# A chunked body is buffered whole, framing included, up to this many bytes; a longer one is answered 413 at once
# (its length is unknown in advance, so the app could not answer it without a thread waiting on the client).
CHUNKED_BODY = BUFFERED_BODY + 64 * 1024
# The largest request head buffered: larger ones are answered 431 (or 414 when the request line alone is). Real
# browsers and clients send a few KiB; gunicorn's own limit (4094 + 100 x 8190 bytes) would let one connection
# cost ~800 KiB.
HEAD_LIMIT = 64 * 1024
# Bodies being buffered may reserve at most this much memory per worker (heads: at most worker_connections x
# HEAD_LIMIT): a request whose body does not fit is answered 503, and requests without a body are still served.
BODY_BUDGET = 32 * 1024 * 1024
worker_connections = 200  # per worker: sockets arriving, kept alive or draining (each costs a file descriptor)
# After an answer sent before the body was read (a 413), the rest of the body is read and dropped, so that the
# client (which sends it all before reading, as urllib does) gets the answer instead of a reset: at most this long
# and this many bytes, in the event loop, so it costs no thread.
DRAIN_TIMEOUT = 10
DRAIN_LIMIT = 64 * 1024 * 1024
# Header lines are looked up in the head as gunicorn's parser reads them (which alone decides the request).
EXPECT_CONTINUE = re.compile(rb"\r\nexpect:[ \t]*100-continue[ \t]*\r\n", re.IGNORECASE)
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([^\r\n]*?)[ \t]*\r\n", re.IGNORECASE)
TRANSFER_ENCODING = re.compile(rb"\r\ntransfer-encoding:([^\r\n]*)\r\n", re.IGNORECASE)
BARE_LF = re.compile(rb"(?<!\r)\n")  # gunicorn refuses a head with one (400) as soon as it sees it
CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,15}")
# A worker whose threads are all busy takes new connections that have waited QUEUE_PATIENCE in the listen queue, if
# one of its requests finished within PROGRESS_WINDOW (seconds).
QUEUE_PATIENCE = 0.1
PROGRESS_WINDOW = 0.05
# Resources running short in accept(): the worker stops accepting for a second instead of dying.
ACCEPT_PAUSE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def received_now(client: socket.socket) -> bytes | None:
    """What a readable non-blocking socket holds: b"" once the client has gone (or the connection broke), None when
    nothing was there after all."""
    try:
        return client.recv(256 * 1024)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


class BufferedConn(TConn):
    """A connection whose request is read without blocking, before a thread is given it."""

    def __init__(self, worker, *args):
        super().__init__(*args)
        self.worker = worker
        self.received = bytearray()
        self.ready = False  # handed to a thread

    def init(self):
        """A thread reads only what has arrived, but should gunicorn ever wait on the client, not for ever."""
        super().init()
        self.sock.settimeout(BODY_TIMEOUT)

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
        self.last_finished = 0.0  # when a request last finished (time.monotonic())
        self.accept_turn = False  # a request finished since a connection was last accepted while busy
        self.queue_waiting_since = None  # since when connections have waited in the listen queue, as last seen
        self.reserved = 0  # bytes of BODY_BUDGET reserved by bodies arriving
        self.accept_paused_until = 0.0
        cfg = self.cfg
        limits = (cfg.limit_request_line, cfg.limit_request_fields, cfg.limit_request_field_size)
        gunicorns = limits[0] + 2 + limits[1] * (limits[2] + 2) + 2 if all(limits) else HEAD_LIMIT
        self.head_limit = min(HEAD_LIMIT, gunicorns)

    def set_accept_enabled(self, enabled):
        """Accept while a thread is free, as a sync worker does: a busy worker leaves new connections to an idle one
        rather than queue them behind its own. But when connections have waited in the listen queue for
        QUEUE_PATIENCE (no worker was free to take them), a busy worker takes one for each request it finishes (a
        finish within PROGRESS_WINDOW), in turn with its kept-alive clients, who would otherwise keep it busy for
        as long as they go on (wrk with 16 kept-alive clients: requests waiting over 2 s). One stuck on a request
        takes none. The listeners have the master's first descriptors, so select() suits them."""
        now = time.monotonic()
        free = self.busy < self.cfg.threads
        turn = not free and self.accept_turn and now - self.last_finished < PROGRESS_WINDOW
        waiting = turn and any(select.select(self.sockets, [], [], 0)[0])
        if not waiting:
            self.queue_waiting_since = None
        elif self.queue_waiting_since is None:
            self.queue_waiting_since = now
        free = free or (waiting and now - self.queue_waiting_since >= QUEUE_PATIENCE)
        super().set_accept_enabled(enabled and free and now >= self.accept_paused_until)

    def update_accepting(self):
        """gthread's loop re-decides only when its connection count changes: a thread taken or freed decides too."""
        self.set_accept_enabled(self.alive and self.nr_conns < self.worker_connections)

    def finish_request(self, conn, fs):
        self.busy -= 1
        self.last_finished = time.monotonic()
        self.accept_turn = True
        super().finish_request(conn, fs)
        self.update_accepting()

    def accept(self, listener):
        if self.cfg.is_ssl:  # TLS is the platform's job here; keep gunicorn's own path for it
            return super().accept(listener)
        try:
            client, address = listener.accept()
        except OSError as error:
            if error.errno in ACCEPT_PAUSE_ERRORS:
                self.log.warning("Not accepting connections for a second: %s", error)
                self.accept_paused_until = time.monotonic() + 1
                self.update_accepting()
            elif error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return None
        self.nr_conns += 1
        if self.busy >= self.cfg.threads:  # its turn taken: the next is after another request finishes
            self.accept_turn = False
        self.receive(BufferedConn(self, self.cfg, client, address, listener.getsockname()))
        self.update_accepting()
        return None

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection's next request is read like a new one."""
        if not isinstance(conn, BufferedConn):
            return super().on_client_socket_readable(conn, client)
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.receive(conn)
        return None

    def enqueue_req(self, conn):
        """A thread gets a request that has arrived; bytes a client sent behind its last request (pipelined) are
        read on like a new request, not by a thread that would wait for the rest of it."""
        if not isinstance(conn, BufferedConn) or conn.ready:
            if isinstance(conn, BufferedConn):
                conn.ready = False
            self.busy += 1
            super().enqueue_req(conn)
            self.update_accepting()
            return None
        return self.receive(conn, conn.parser.unreader.take_buffered())

    def handle_request(self, req, conn):
        """gunicorn would send a second 100 Continue, and keep alive a connection whose body is left unread."""
        if getattr(conn, "continued", False):
            req._expected_100_continue = False
        if getattr(conn, "oversized", False):
            req.force_close()
        return super().handle_request(req, conn)

    def receive(self, conn, received=b""):
        conn.sock.setblocking(False)
        conn.received[:] = received
        conn.scanned = 0  # the head's end is searched for from here
        conn.body_start = None  # once the head is in
        conn.wanted = None  # bytes that make the whole request, once known (None while a chunked body arrives)
        conn.chunk_at = None  # where the next chunk of a chunked body starts
        conn.reserved = 0
        conn.continued = conn.oversized = False
        conn.timeout = time.monotonic() + HEAD_TIMEOUT
        self.arriving.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_request_bytes, conn))
        if received:
            self.check_arrived(conn)

    def on_request_bytes(self, conn, client):
        chunk = received_now(client)
        if chunk is None:
            return
        if not chunk:  # the client left before its request was whole
            self.stop_receiving(conn)
            self.nr_conns -= 1
            conn.close()
            return
        conn.received += chunk
        self.check_arrived(conn)

    def check_arrived(self, conn):
        received = conn.received
        if conn.body_start is None:
            end = received.find(b"\r\n\r\n", conn.scanned)
            head_end = end + 4 if end >= 0 else len(received)
            if BARE_LF.search(received, conn.scanned, head_end):
                return self.hand_over(conn)
            conn.scanned = max(0, len(received) - 3)  # each byte is searched once, however the head trickles in
            if head_end > self.head_limit:
                return self.refuse(conn, 431 if received.find(b"\r\n", 0, self.head_limit) >= 0 else 414)
            if end < 0:
                return None
            if not self.read_head(conn, received[: end + 2]):
                return None
            conn.body_start = head_end
        if conn.wanted is None:
            conn.wanted = self.chunked_end(conn)
            if conn.wanted is None and len(received) - conn.body_start > CHUNKED_BODY:
                return self.refuse(conn, 413)
        if conn.wanted is not None and len(received) >= conn.wanted:
            return self.hand_over(conn)
        return None

    def read_head(self, conn, head):
        """Decide how much body to wait for; False when the connection was handed over or refused already."""
        encoding = TRANSFER_ENCODING.findall(head)
        length = CONTENT_LENGTH.search(head)
        if encoding:  # gunicorn answers 400 or 501 without reading a body unless it is just chunked
            if length or not encoding[-1].strip(b" \t").lower().endswith(b"chunked"):
                self.hand_over(conn)
                return False
            body = None
            reserve = CHUNKED_BODY
        elif length:  # parsed as gunicorn does (any number of digits); it answers 400 to anything else
            value = length.group(1).decode("latin-1")
            body = int(value) if value.isascii() and value.isdigit() else None
            if body is None or body > BUFFERED_BODY:  # a 400, or a 413 from the app without reading the body
                conn.oversized = body is not None
                self.hand_over(conn)
                return False
            reserve = body
        else:
            body = reserve = 0
        if self.reserved + reserve > BODY_BUDGET:
            self.refuse(conn, 503)
            return False
        self.reserved += reserve
        conn.reserved = reserve
        conn.chunk_at = len(head) + 2
        conn.wanted = None if body is None else len(head) + 2 + body
        if conn.wanted is None or len(conn.received) < conn.wanted:
            if EXPECT_CONTINUE.search(head):  # the client sends its body once told to: tell it here, not in a thread
                with suppress(OSError):
                    conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                conn.continued = True
            self.arriving.remove(conn)
            conn.timeout = time.monotonic() + BODY_TIMEOUT
            self.arriving.append(conn)
        return True

    def chunked_end(self, conn):
        """Where the chunked body ends, once it has all arrived (None before); gunicorn's parser reads it again."""
        received, at = conn.received, conn.chunk_at
        while (line_end := received.find(b"\r\n", at)) >= 0:
            size = CHUNK_SIZE.fullmatch(bytes(received[at:line_end]).split(b";")[0].strip(b" \t"))
            if size is None:  # broken: gunicorn answers 400 when it reads this far
                return line_end
            if int(size.group(), 16) == 0:  # the last chunk, then trailer lines up to an empty one
                end = received.find(b"\r\n\r\n", line_end)
                return end + 4 if end >= 0 else None
            at = line_end + 2 + int(size.group(), 16) + 2
            if at > len(received):
                return None
            conn.chunk_at = at
        return len(received) if len(received) - at > 1024 else None  # a chunk-size line that long is broken

    def stop_receiving(self, conn):
        self.poller.unregister(conn.sock)
        self.arriving.remove(conn)
        self.reserved -= conn.reserved
        conn.reserved = 0

    def hand_over(self, conn):
        """The request is here (or gunicorn will answer it from what has arrived): a thread parses and serves it."""
        self.stop_receiving(conn)
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(conn.received))
        conn.received.clear()
        conn.initialized = conn.data_ready = conn.ready = True
        self.enqueue_req(conn)

    def refuse(self, conn, status):
        """Answer from the event loop a request that cannot be buffered, and drain what the client still sends."""
        self.stop_receiving(conn)
        with suppress(OSError):
            write_json_error(conn.sock, status, "", "")
        self.nr_conns -= 1
        conn.close(graceful=True)

    def drain(self, client):
        """Send FIN, then read and drop what the client still sends, without blocking; closed at its end, after
        DRAIN_TIMEOUT or DRAIN_LIMIT bytes, whichever comes first. It counts as a connection (worker_connections)."""
        try:
            client.shutdown(socket.SHUT_WR)
            client.setblocking(False)
        except OSError:
            gunicorn.util.close(client)
            return
        entry = [time.monotonic() + DRAIN_TIMEOUT, client, 0]
        self.nr_conns += 1
        self.draining.append(entry)
        self.poller.register(client, selectors.EVENT_READ, partial(self.on_drain_bytes, entry))

    def on_drain_bytes(self, entry, client):
        chunk = received_now(client)
        if chunk is None:
            return
        entry[2] += len(chunk)
        if not chunk or entry[2] > DRAIN_LIMIT:
            self.draining.remove(entry)
            self.end_drain(client)

    def end_drain(self, client):
        with suppress(KeyError, ValueError, OSError):
            self.poller.unregister(client)
        gunicorn.util.close(client)
        self.nr_conns -= 1

    def murder_pending(self):
        """Also close the connections whose request did not arrive in time (with a 408), and end old drains."""
        super().murder_pending()
        self.update_accepting()  # connections may have waited long enough in the listen queue by now
        now = time.monotonic()
        for conn in [conn for conn in self.arriving if conn.timeout <= now]:  # head and body deadlines interleave
            self.stop_receiving(conn)
            self.nr_conns -= 1
            with suppress(OSError):
                write_json_error(conn.sock, 408, "", "")
            conn.close()
        while self.draining and self.draining[0][0] <= now:
            self.end_drain(self.draining.popleft()[1])


worker_class = BufferingWorker  # threads (GUNICORN_THREADS) serve requests; one per worker unless set

# gunicorn answers some requests itself, before the app sees them, with an HTML page. The service answers every
# error with its JSON envelope, so the one function gunicorn writes them with (util.write_error, called by the
# workers' handle_error) writes that instead; the worker above answers with it too.
GUNICORN_ERRORS = {
    400: "Bad request: the request line or a header is not valid HTTP.",
    403: "Forbidden.",
    408: "The request did not arrive in time: send it whole, without pauses.",
    413: "Request body too large: the limit is 1 MB.",
    414: "Request line too long: the limit is 4094 bytes (shorten the URL or its query string).",
    417: "Expectation failed: only 'Expect: 100-continue' is understood.",
    431: "Request headers too large: at most 100 headers of up to 8190 bytes each, 64 KiB in all.",
    501: "Not implemented: the only transfer coding understood is chunked.",
    503: "The server is busy receiving other requests; try again shortly.",
}


def write_json_error(client, status, _reason, _message):
    """gunicorn's own error answers, in the service's error envelope (gunicorn's message may echo the request)."""
    body = json.dumps(
        {"error": GUNICORN_ERRORS.get(status, "Internal server error; try again later."), "details": {}}
    ).encode()
    retry = "Retry-After: 5\r\n" if status == 503 else ""
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{retry}Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n"
    )
    gunicorn.util.write_nonblock(client, head.encode("latin-1") + body)


gunicorn.util.write_error = write_json_error
