"""The production server (gunicorn with gunicorn.conf.py) under abuse: slow clients, requests gunicorn itself refuses,
and bodies far over the limit. Each test starts real servers and talks to them over real sockets."""

import json
import re
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

import pytest

from helpers import DEV_SERVER, PRODUCTION, ROOT, call

# The production server as `gunicorn app:app` starts it in the image: every setting from gunicorn.conf.py.
PRODUCTION_SERVER = [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:{port}", "app:app"]
TWELVE_MB = 12 * 1000 * 1000


@pytest.fixture
def start_production_server(servers, environment, redis_prefix):
    """Starts gunicorn as production runs it (2 workers) on a migrated database, with ``settings`` added."""

    def start(command=PRODUCTION_SERVER, **settings):
        production = environment | PRODUCTION | {"RATELIMIT_KEY_PREFIX": redis_prefix, **settings}
        upgrade = subprocess.run(
            [sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, env=production, capture_output=True, timeout=120
        )
        assert upgrade.returncode == 0, upgrade.stderr.decode()
        return servers.start(command, production)

    return start


@pytest.fixture
def production_server(start_production_server):
    return start_production_server()


def connect(server) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def read_all(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (at most 10 s between pieces)."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def raw_request(server, data: bytes) -> tuple[int, dict, dict]:
    """Send ``data`` as it is; the status, headers (lower-case names) and JSON body of the answer."""
    with connect(server) as connection:
        connection.sendall(data)
        return parse(read_all(connection))


def parse(answer: bytes) -> tuple[int, dict, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


def assert_json_error(status: int, headers: dict, body: dict, expected: int) -> None:
    assert status == expected, (status, body)
    assert headers["content-type"] == "application/json"
    assert set(body) == {"error", "details"} and body["details"] == {}
    assert isinstance(body["error"], str) and body["error"]


LOGIN_HEAD = b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
HALF_ARRIVED = [
    LOGIN_HEAD + b"Expect: 100-continue\r\nContent-Length: 40\r\n\r\n",  # and the body never comes
    LOGIN_HEAD + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"use',
    LOGIN_HEAD + b'Content-Length: 0000000000000000000040\r\n\r\n{"username": ',
    # Longer than any head gunicorn accepts (4094 + 100 x 8192 bytes), and not ended.
    b"GET /api/health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 8000) for i in range(104)),
]


def test_slow_clients_do_not_stall_the_production_server(production_server):
    slow = []
    for _ in range(4):  # half a request line, then nothing
        slow.append(connect(production_server))
        slow[-1].sendall(b"GET /api/hea")
    for _ in range(2):  # a whole head announcing a body, and half the body
        slow.append(connect(production_server))
        slow[-1].sendall(b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        slow[-1].sendall(b'Content-Length: 40\r\n\r\n{"username": ')
    for shape in HALF_ARRIVED:  # requests whose rest gunicorn would have waited for in a thread, for ever
        slow.append(connect(production_server))
        slow[-1].sendall(shape)
    keep_alive = connect(production_server)  # one request answered, then half of the next on the same connection
    keep_alive.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert keep_alive.recv(65536).startswith(b"HTTP/1.1 200 ")
    keep_alive.sendall(b"GET /api/he")
    slow.append(keep_alive)

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: call("GET", f"{production_server.url}/api/health")[0], range(12)))
    elapsed = time.monotonic() - started

    assert statuses == [200] * 12
    # Generous: they take well under a second; a worker held by a slow client stalls until gunicorn's 30 s timeout,
    # and a mere timeout on reading heads (10 s) would stall them that long.
    assert elapsed < 8, f"answered only after {elapsed:.1f} s"
    for connection in slow:
        connection.close()


def test_a_request_head_that_does_not_arrive_in_time_gets_a_408_and_is_closed(start_production_server):
    server = start_production_server(GUNICORN_HEAD_TIMEOUT="1")
    with connect(server) as connection:
        connection.sendall(b"GET /api/hea")

        status, headers, body = parse(read_all(connection))  # the server closes it: no wait past that

    assert_json_error(status, headers, body, 408)


CHUNKED_LOGIN = (
    b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)
GUNICORN_REFUSALS = [
    (414, b"GET /api/health?" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    (431, b"GET /api/health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(120)) + b"\r\n"),
    (431, b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n"),
    (400, b"not a request line\r\n\r\n"),
    (400, b"G\x01T /api/health HTTP/1.1\r\nHost: x\r\n\r\n"),
    (400, b"GET /api/health HTTP/9.1\r\nHost: x\r\n\r\n"),
    (400, b"GET /api/health HTTP/1.1\r\nHost: x\r\nBad Name: a\r\n\r\n"),
    (400, b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"),
    (417, b"GET /api/health HTTP/1.1\r\nHost: x\r\nExpect: 100-wonder\r\n\r\n"),
    # A chunked body that breaks off into nonsense: found while the app reads it, and answered by the app.
    (400, CHUNKED_LOGIN + b'5\r\n{"a":\r\nzz\r\n1}\r\n0\r\n\r\n'),
    (400, CHUNKED_LOGIN + b"2\r\n{}XX0\r\n\r\n"),
    (400, b"GET /api/health HTTP/1.1\nHost: x\n\n"),  # bare LF: at once, not a 408 once the head has timed out
    (501, b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo\r\n\r\n"),
    # A head within gunicorn's limits but over the worker's 64 KiB
    (431, b"GET /api/health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 8000) for i in range(9))),
    # A chunked body over 1 MiB and its framing: answered before it has all been read
    (413, CHUNKED_LOGIN + b"".join(b"10000\r\n" + b"a" * 0x10000 + b"\r\n" for _ in range(20)) + b"0\r\n\r\n"),
]


def test_requests_gunicorn_refuses_itself_get_the_json_envelope(production_server):
    for expected, data in GUNICORN_REFUSALS:
        with connect(production_server) as connection:
            connection.sendall(data)
            answer = read_all(connection)
        status, headers, body = parse(answer)

        assert_json_error(status, headers, body, expected)
        status_line = answer.split(b"\r\n")[0].decode().lower()  # Werkzeug's own reasons are in capitals
        assert status_line == f"HTTP/1.1 {expected} {HTTPStatus(expected).phrase}".lower()
        assert "<" not in body["error"]


def post_twelve_megabytes(url: str) -> tuple[int, str, dict]:
    """What Python's urllib does: send the whole body, then read the answer."""
    request = urllib.request.Request(
        f"{url}/api/auth/login", data=b"x" * TWELVE_MB, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], json.loads(error.read())


def test_a_whole_12_mb_body_gets_the_413_from_the_production_server(production_server):
    for _ in range(3):  # every time, not by luck of timing
        status, content_type, body = post_twelve_megabytes(production_server.url)

        assert (status, content_type) == (413, "application/json"), body
        assert set(body) == {"error", "details"} and "1 MB" in body["error"]
    assert call("GET", f"{production_server.url}/api/health")[0] == 200


def test_a_whole_12_mb_body_gets_the_413_from_the_development_server(servers, environment):
    server = servers.start(DEV_SERVER, environment)

    status, content_type, body = post_twelve_megabytes(server.url)

    assert (status, content_type) == (413, "application/json"), body
    assert set(body) == {"error", "details"} and "1 MB" in body["error"]


def test_a_client_that_waits_for_100_continue_is_told_to_send_its_body(production_server):
    body = json.dumps({"username": "nobody", "password": "wrong-password"}).encode()
    with connect(production_server) as connection:
        connection.sendall(
            b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        assert connection.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n")  # not held until the body arrives
        connection.sendall(body)

        status, headers, answer = parse(read_all(connection))

    assert_json_error(status, headers, answer, 401)


def test_a_413_for_a_body_too_large_to_read_says_the_connection_closes(production_server):
    with connect(production_server) as connection:
        connection.sendall(LOGIN_HEAD + b"Content-Length: %d\r\n\r\n" % TWELVE_MB)

        status, headers, body = parse(read_all(connection))  # the body is never sent: the server closes at once

    assert_json_error(status, headers, body, 413)
    assert headers["connection"] == "close"


def test_a_worker_whose_thread_is_busy_leaves_new_connections_to_the_other(production_server):
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads nothing: the thread waits on it
    hog.connect(("127.0.0.1", production_server.port))
    hog.sendall(b"GET /api/docs/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\n\r\n" * 20)  # 20 x 1.7 MB
    assert hog.recv(12) == b"HTTP/1.1 200"  # its worker's one thread is serving it, and soon stuck sending it

    def health(_):
        try:
            with urllib.request.urlopen(f"{production_server.url}/api/health", timeout=10) as response:
                return response.status
        except OSError as error:  # timed out: queued behind the stuck thread
            return repr(error)

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(health, range(20)))

    hog.close()
    assert statuses == [200] * 20  # none queued behind the stuck thread while the other worker was free


def test_a_worker_kept_busy_by_a_client_still_takes_new_connections_in_turn(start_production_server):
    """A client that keeps a worker's thread busy (here 400 requests pipelined on one connection: each is served as
    soon as the one before it is) does not keep a new connection waiting in the listen queue until it is done: the
    worker takes it in turn, as it does with kept-alive clients that ask again as soon as they are answered."""
    server = start_production_server(WEB_CONCURRENCY="1")
    busy = connect(server)
    busy.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n" * 400)
    answered = busy.recv(65536)  # the worker is at it

    status, probe = call("GET", f"{server.url}/api/health")
    while answered.count(b"HTTP/1.1 200") < 400:
        answered += busy.recv(65536)
    busy.close()

    assert status == 200
    last = max(re.findall(rb'"timestamp":"([^"]+)"', answered)).decode()
    assert probe["timestamp"] < last, "the new connection waited for all 400 pipelined requests"


def test_bodies_being_buffered_have_a_memory_budget_per_worker(production_server):
    # Each announces a body of 1 MiB and sends none of it: a worker buffers at most 32 MiB of bodies at once
    # (32 such requests), so of 80 at least 80 - 2 x 32 are answered 503 at once, instead of all waiting 30 s.
    waiting = [connect(production_server) for _ in range(80)]
    for connection in waiting:
        connection.sendall(LOGIN_HEAD + b"Content-Length: %d\r\n\r\n" % (1024 * 1024))
    assert call("GET", f"{production_server.url}/api/health")[0] == 200  # requests without a body are still served

    refused = []
    deadline = time.monotonic() + 10  # generous: they are answered as soon as they arrive
    while len(refused) < 16 and time.monotonic() < deadline:
        readable, _, _ = select.select([c for c in waiting if c not in refused], [], [], 1)
        for connection in readable:
            status, headers, body = parse(read_all(connection))
            assert_json_error(status, headers, body, 503)
            assert headers["retry-after"] == "5"
            refused.append(connection)
    for connection in waiting:
        connection.close()
    assert len(refused) >= 16


def test_running_out_of_file_descriptors_pauses_accepting_instead_of_killing_the_worker(start_production_server):
    limited = ["prlimit", "--nofile=128", *PRODUCTION_SERVER]  # the server's processes may open 128 files each
    server = start_production_server(limited, WEB_CONCURRENCY="1")
    clients = []
    for _ in range(200):  # HTTP/1.0: each answered, then held open by the client while the server drains it
        clients.append(connect(server))
        clients[-1].sendall(b"GET /api/health HTTP/1.0\r\n\r\n")
    for connection in clients:
        connection.settimeout(15)
        assert connection.recv(9) == b"HTTP/1.0 "  # every one answered (once drains ended, for the later ones)
    for connection in clients:
        connection.close()

    assert call("GET", f"{server.url}/api/health")[0] == 200
    server.stop()
    log = server.log.read_text()
    assert "Too many open files" in log  # the limit was reached...
    assert "Traceback" not in log and log.count("Booting worker") == 1  # ...and the one worker lived on
