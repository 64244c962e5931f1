"""Slow clients against the production server: while N connections each send half a request line and then nothing
(or a byte now and then; or another half request, --shape), does everyone else still get answers, and how fast?

    .venv/bin/python bench/slowloris.py                         # gunicorn.conf.py at 0, 2 and 50 slow connections
    .venv/bin/python bench/slowloris.py --setups conf,sync,gthread,gevent,nginx --wrk
    .venv/bin/python bench/slowloris.py --url http://127.0.0.1:10000 --slow 50     # a server already running here
    .venv/bin/python bench/slowloris.py --setups conf,sync --shape expect          # Expect: 100-continue, no body

Each setup is started here as production runs it (APP_ENV=production, gunicorn.conf.py, a scratch SQLite database
unless --postgres, rate limits counted in Redis under a prefix of the run's own, far above what the run sends):
- conf:    gunicorn.conf.py as it is (what `gunicorn app:app` and the Docker image run)
- sync:    with --worker-class sync (2 sync workers, the setting before slow clients were measured)
- gthread: with --worker-class gthread and GUNICORN_THREADS=4 (2 workers x 4 threads)
- gevent:  with --worker-class gevent (needs gevent importable: --gevent-path)
- nginx:   nginx in front of 2 sync workers (a buffering proxy, as gunicorn's documentation advises for them)
For each number of slow connections, the slow connections are opened first and kept open (one that the server
closes is opened again, as an attacker would), then one client sends GET /api/health on a new connection, one after
the other, for --seconds, each given --timeout to answer. The table shows how many were answered, how many failed or
timed out, and their latency. --wrk adds a short wrk run (16 connections, GET /api/tasks with a token, no slow
connections) per setup, for normal throughput. Only 127.0.0.1 is ever a target; every loop is bounded in time.
"""

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import run

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
NGINX_TEMPLATE = """
worker_processes 1;
pid {folder}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    client_header_timeout 10s;
    client_body_timeout 10s;
    send_timeout 10s;
    keepalive_timeout 5s;
    client_max_body_size 2m;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{upstream};
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""
# name: (gunicorn options over gunicorn.conf.py, environment, nginx in front)
SETUPS = {
    "conf": ([], {}, False),
    "sync": (["--worker-class", "sync"], {}, False),
    "gthread": (["--worker-class", "gthread"], {"GUNICORN_THREADS": "4"}, False),
    "gevent": (["--worker-class", "gevent"], {}, False),
    "nginx": (["--worker-class", "sync"], {}, True),
}
LOGIN = b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
SHAPES = {  # what each slow connection sends, then nothing (--shape)
    "line": b"GET /api/hea",  # half a request line
    "body": LOGIN + b'Content-Length: 40\r\n\r\n{"username": ',  # a whole head and half its body
    "expect": LOGIN + b"Expect: 100-continue\r\nContent-Length: 40\r\n\r\n",  # waits for 100, then sends nothing
    "chunked": LOGIN + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"use',  # half a chunked body
}


SHAPE_NAMES = {
    "line": "half a request line",
    "body": "a head and half its body",
    "expect": "a head with Expect: 100-continue and no body",
    "chunked": "half a chunked body",
}


@dataclass
class Probe:
    latencies: list[float] = field(default_factory=list)  # seconds, answered ones
    failures: dict[str, int] = field(default_factory=dict)

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


class SlowClients:
    """``count`` connections that each sent half a request line, kept open (reopened when the server closes one)
    until stopped; with ``trickle``, each sends one more byte every ``trickle`` seconds."""

    def __init__(self, host: str, port: int, count: int, trickle: float, shape: str = "line"):
        self.address = (host, port)
        self.sent = SHAPES[shape]
        self.count = count
        self.trickle = trickle
        self.sockets: list[socket.socket] = []
        self.closed_by_server = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.keep_open, daemon=True)

    def open_one(self) -> socket.socket | None:
        try:
            connection = socket.create_connection(self.address, timeout=2)
            connection.sendall(self.sent)
            connection.setblocking(False)
            return connection
        except OSError:
            return None

    def __enter__(self) -> "SlowClients":
        for _ in range(self.count):
            connection = self.open_one()
            if connection:
                self.sockets.append(connection)
        time.sleep(1)  # let the server take them (accept, read the first bytes) before anyone else asks
        self.thread.start()
        return self

    def keep_open(self) -> None:
        last_trickle = time.monotonic()
        while not self.stopping.wait(0.2):
            trickle_now = self.trickle and time.monotonic() - last_trickle >= self.trickle
            if trickle_now:
                last_trickle = time.monotonic()
            for index, connection in enumerate(self.sockets):
                alive = True
                try:
                    connection.recv(4096)  # the server closed it, or answered (an error): spent either way
                    alive = False
                except BlockingIOError:
                    pass
                except OSError:
                    alive = False
                if alive and trickle_now:
                    with contextlib.suppress(OSError):
                        connection.send(b"a")
                if not alive:
                    self.closed_by_server += 1
                    connection.close()
                    self.sockets[index] = self.open_one() or connection
            self.sockets = [connection for connection in self.sockets if connection.fileno() != -1]
            while len(self.sockets) < self.count and not self.stopping.is_set():
                connection = self.open_one()
                if connection is None:
                    break
                self.sockets.append(connection)

    def __exit__(self, *_exc) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        for connection in self.sockets:
            connection.close()


def probe(url: str, seconds: float, timeout: float) -> Probe:
    """GET /api/health, one after the other on new connections, for ``seconds``."""
    result = Probe()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=timeout) as response:
                response.read()
                result.latencies.append(time.monotonic() - started)
        except urllib.error.HTTPError as error:
            result.fail(f"HTTP {error.code}")
        except TimeoutError:
            result.fail("timed out")
        except urllib.error.URLError as error:
            result.fail("timed out" if isinstance(error.reason, TimeoutError) else type(error.reason).__name__)
        except OSError as error:
            result.fail(type(error).__name__)
    return result


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def row(setup: str, slow: int, result: Probe, closed: int) -> list[str]:
    answered = result.latencies
    failed = sum(result.failures.values())
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(result.failures.items()))
    shown = [f"{1000 * value:.1f}" for value in (
        (statistics.median(answered), percentile(answered, 0.99), max(answered)) if answered else ()
    )] or ["-", "-", "-"]  # fmt: skip
    return [setup, str(slow), str(len(answered)), f"{failed}" + (f" ({kinds})" if kinds else ""), *shown, str(closed)]


def table(header: list[str], rows: list[list[str]]) -> str:
    rule = "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


class Nginx:
    """nginx on a free port in front of ``upstream`` (host:port), with the measured settings, stopped on exit."""

    def __init__(self, upstream: str, folder: Path):
        self.folder = folder
        self.port = run.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.upstream = upstream

    def __enter__(self) -> "Nginx":
        text = NGINX_TEMPLATE.format(folder=self.folder, port=self.port, upstream=self.upstream)
        (self.folder / "nginx.conf").write_text(text)
        self.process = subprocess.Popen(
            ["nginx", "-p", str(self.folder), "-c", str(self.folder / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=open(self.folder / "nginx.log", "w"), start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/api/health", timeout=2) as answer:
                if answer.status == 200:
                    return self
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.__exit__()
        raise run.BenchError(f"nginx did not start: {(self.folder / 'nginx.log').read_text()[-2000:]}")

    def __exit__(self, *_exc) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


class ScratchSQLite:
    """A temporary SQLite database: what run.App needs of run.Database."""

    def __init__(self, folder: Path):
        self.url = f"sqlite:///{folder / 'slowloris.db'}"

    def create(self) -> None:
        pass

    def drop(self) -> None:
        pass


def make_app(args, folder: Path, setup: str, password: str, database) -> run.App:
    app = run.App(SimpleNamespace(redis_url=args.redis_url, port=None), database, name="slowloris", out=folder)
    app.env.pop("GUNICORN_THREADS", None)
    app.env.pop("WEB_CONCURRENCY", None)
    app.env["ADMIN_PASSWORD"] = app.admin_password = password
    app.env |= SETUPS[setup][1]
    if setup == "gevent" and args.gevent_path:
        app.env["PYTHONPATH"] = args.gevent_path
    return app


def token_for(url: str, password: str) -> str:
    request = urllib.request.Request(
        f"{url}/api/auth/login",
        data=run.json.dumps({"username": "admin", "password": password}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return run.json.loads(response.read())["access_token"]


def measure(args, setup: str, url: str, token: str | None) -> tuple[list[list[str]], list[str] | None]:
    parsed = urllib.parse.urlsplit(url)
    rows = []
    for slow in args.slow:
        with SlowClients(parsed.hostname, parsed.port, slow, args.trickle, args.shape) as slow_clients:
            result = probe(url, args.seconds, args.timeout)
            closed = slow_clients.closed_by_server
        rows.append(row(setup, slow, result, closed))
        run.log(f"{setup}: {' | '.join(rows[-1][1:])}")
        time.sleep(1)
    throughput = None
    if args.wrk and token:
        scenario = run.Scenario("list_default", "GET /api/tasks", "GET", "/api/tasks")
        figures = run.wrk(SimpleNamespace(url=url), scenario, token, 16, args.wrk_seconds)
        throughput = [setup, f"{figures['rps']:.0f}", f"{figures['p50']:.1f}", f"{figures['p99']:.1f}"]
        throughput.append(figures["error"] or "none")
        run.log(f"{setup}: wrk {' | '.join(throughput[1:])}")
    return rows, throughput


def run_setup(args, setup: str) -> tuple[list[list[str]], list[str] | None]:
    folder = Path(tempfile.mkdtemp(prefix=f"finstack-slowloris-{setup}-"))
    if args.postgres:
        database = run.Database(args.postgres, "finstack_slowloris", prefix="finstack_slowloris")
    else:
        database = ScratchSQLite(folder)
    database.create()
    app = make_app(args, folder, setup, args.admin_password, database)
    overrides, _environment, nginx_in_front = SETUPS[setup]
    try:
        app.flask("db", "upgrade", log_name="flask.log")
        with run.Server(app, setup, overrides) as server:
            token = token_for(server.url, app.admin_password)
            if nginx_in_front:
                with Nginx(f"127.0.0.1:{server.port}", folder) as front:
                    return measure(args, setup, front.url, token)
            return measure(args, setup, server.url, token)
    finally:
        app.cleanup()
        database.drop()
        shutil.rmtree(folder, ignore_errors=True)


def local_url(text: str) -> str:
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme != "http" or parsed.hostname not in ("127.0.0.1", "localhost", "::1") or not parsed.port:
        raise argparse.ArgumentTypeError("give http://127.0.0.1:PORT (or localhost, [::1]): only this machine")
    return text.rstrip("/")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", type=local_url, help="a server already running on this machine (no setups started)")
    parser.add_argument("--setups", default="conf", help=f"comma-separated, of {', '.join(SETUPS)} (default conf)")
    parser.add_argument("--slow", default="0,2,50", help="numbers of slow connections (default 0,2,50)")
    parser.add_argument("--seconds", type=float, default=15, help="how long normal requests are sent (default 15)")
    parser.add_argument("--timeout", type=float, default=10, help="seconds each normal request waits (default 10)")
    parser.add_argument("--shape", choices=SHAPES, default="line", help="what slow clients send (default line)")
    parser.add_argument("--trickle", type=float, default=0, help="each slow client sends a byte every S s (0: never)")
    parser.add_argument("--wrk", action="store_true", help="also measure throughput with wrk (16 connections)")
    parser.add_argument("--wrk-seconds", type=int, default=5)
    parser.add_argument(
        "--postgres",
        help="a PostgreSQL server (postgresql://postgres@127.0.0.1:5432) for a database finstack_slowloris, made and "
        "dropped for each setup (default: a scratch SQLite file)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--gevent-path", help="a folder holding gevent, put on PYTHONPATH for the gevent setup")
    args = parser.parse_args(argv)
    args.admin_password = secrets.token_urlsafe(18)
    args.slow = [int(value) for value in args.slow.split(",")]
    if max(args.slow) > 500:
        parser.error("at most 500 slow connections")
    args.setups = [name.strip() for name in args.setups.split(",")]
    unknown = set(args.setups) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setups: {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, throughputs = [], []
    if args.url:
        found, throughput = measure(args, "given URL", args.url, None)
        rows += found
    else:
        for setup in args.setups:
            found, throughput = run_setup(args, setup)
            rows += found
            throughputs += [throughput] if throughput else []
    print()
    trickle = f", a byte every {args.trickle:g} s" if args.trickle else ""
    print(
        f"Normal requests (GET /api/health, one at a time, {args.seconds:g} s, each waiting {args.timeout:g} s) "
        f"while slow connections hold {SHAPE_NAMES[args.shape]}{trickle}:"
    )
    print(table(["setup", "slow", "answered", "failed", "p50 ms", "p99 ms", "max ms", "slow closed"], rows))
    if throughputs:
        print(f"\nwrk, 16 connections, {args.wrk_seconds} s, GET /api/tasks, no slow connections:")
        print(table(["setup", "req/s", "p50 ms", "p99 ms", "errors"], throughputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
