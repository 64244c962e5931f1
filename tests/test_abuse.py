"""The production server (gunicorn with gunicorn.conf.py) under abuse: slow clients, requests gunicorn itself refuses,
and bodies far over the limit. Each test starts real servers and talks to them over real sockets."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import DEV_SERVER, PRODUCTION, ROOT, call

# The production server as `gunicorn app:app` starts it in the image: every setting from gunicorn.conf.py.
PRODUCTION_SERVER = [sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:{port}", "app:app"]
TWELVE_MB = 12 * 1000 * 1000


@pytest.fixture
def start_production_server(servers, environment, redis_prefix):
    """Starts gunicorn as production runs it (2 workers) on a migrated database, with ``settings`` added."""

    def start(**settings):
        production = environment | PRODUCTION | {"RATELIMIT_KEY_PREFIX": redis_prefix, **settings}
        upgrade = subprocess.run(
            [sys.executable, "-m", "flask", "db", "upgrade"], cwd=ROOT, env=production, capture_output=True, timeout=120
        )
        assert upgrade.returncode == 0, upgrade.stderr.decode()
        return servers.start(PRODUCTION_SERVER, production)

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


def test_slow_clients_do_not_stall_the_production_server(production_server):
    slow = []
    for _ in range(4):  # half a request line, then nothing
        slow.append(connect(production_server))
        slow[-1].sendall(b"GET /api/hea")
    for _ in range(2):  # a whole head announcing a body, and half the body
        slow.append(connect(production_server))
        slow[-1].sendall(b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        slow[-1].sendall(b'Content-Length: 40\r\n\r\n{"username": ')
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
]


def test_requests_gunicorn_refuses_itself_get_the_json_envelope(production_server):
    for expected, data in GUNICORN_REFUSALS:
        status, headers, body = raw_request(production_server, data)

        assert_json_error(status, headers, body, expected)
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
