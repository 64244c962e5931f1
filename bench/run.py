"""`make bench`: seed PostgreSQL, serve the app with gunicorn on 127.0.0.1, drive a bounded load with wrk, and
write bench/results.md and bench/results.png (and the table between the bench markers of docs/performance.md).

    .venv/bin/python bench/run.py                        # 100k and 1M tasks, about 12 minutes
    .venv/bin/python bench/run.py --quick                # 2,000 tasks, 1 s per scenario: a smoke run (bench/out/)
    .venv/bin/python bench/run.py --compare-workers      # default list at 1 and 16 clients per gunicorn setup
    .venv/bin/python bench/run.py --sizes 100000 --profile-only   # bench/profile.md only, no load

Every scenario is one wrk run (after a warm-up) of one request, with one client unless said otherwise; any
answer outside 2xx fails the scenario (and the run's exit status) instead of being averaged in. The app runs as
production does (INFO request logs, limits in Redis). Before it, at each size, bench/minimal_app.py (one route, the
default list's SELECT through psycopg2) is served the same way and measured: the issue's targets are multiples of
its figures (TARGET_RATIOS), since machines differ and the ratio does not. Beside each scenario,
bench/sqltime.py times the statements the app sends for that request under EXPLAIN ANALYZE, so the report shows
the app's overhead over PostgreSQL's own time; at the largest size bench/profiler.py attributes each request's time
to the token check, limiter, SQL, ORM... (bench/profile.md). Missed targets are reported, not a failure (unless
--strict). Nothing outlives the run: gunicorn is stopped, the finstack_bench database dropped (unless --keep-db)
and the rate-limit keys removed from Redis. bench/load.py runs the same load against any other deployment.
"""

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg2
import report

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
BIN = Path(sys.executable).parent
LUA = BENCH / "scenario.lua"

DEFAULT_SIZES = "100000,1000000"
DEFAULT_WORKER_CONFIGS = "sync:2,sync:3,sync:4,sync:5,gthread:2x4,gthread:3x2"
DEMO_PASSWORD = "demo-password"
ADMIN = "demo0001"  # seed-demo makes demo0001 an administrator: it may change every task
# seed-demo refuses production (its administrator's password is published): the benchmark's own throwaway
# database is seeded as development, then served as production.
DEMO_SEEDING = {"APP_ENV": "development"}
CREATE_MARK = "Bench Create Co"
PER_PAGE = 20  # the list's default page size
SORT_FIELDS = ("date_created", "task_time", "entity_name", "task_type", "status", "updated_at")
GUNICORN_KEYS = ("workers", "worker_class", "threads", "keepalive", "preload_app", "timeout")
MINIMAL_APP = "minimal_app:app"  # bench/minimal_app.py, served with bench/minimal_gunicorn.py
PARTIAL_SHARE = 0.02  # the partial match searches for a fragment found in about this share of the tasks

# The targets, at 1M tasks: p50 with one client at most this many times the minimal app's list p50 (measured
# in the same run), and the default list with --clients clients at least THROUGHPUT_RATIO times its throughput.
TARGET_RATIOS = {
    "list_default": 2,
    "list_status": 2,
    "list_assignee": 2,
    "cursor_page": 2,
    "task_get": 1.5,
    "create": 1.5,
    "status_patch": 1.5,
    "health": 1,
    "dashboard": 2,
    "list_partial": 10,  # with an exact total
    "bulk_status": 30,
}
THROUGHPUT_RATIO = 0.5
# Also run with --clients clients at the largest size: the endpoints the original app's figures (issue 14) give a
# throughput for, beside the default list.
CONCURRENT_TOO = ("health", "task_get", "dashboard")
PROFILED = tuple(TARGET_RATIOS)  # bench/profiler.py's scenarios, at the largest size


@dataclass
class Scenario:
    name: str
    shown: str  # what the report shows for the request
    method: str
    path: str
    bodies: list[str] = field(default_factory=list)
    auth: bool = True
    skip: str | None = None
    expect_total: int | None = None  # the exact pagination.total the answer must give

    @property
    def target_ratio(self) -> float | None:
        return TARGET_RATIOS.get(self.name)


class BenchError(RuntimeError):
    """The run cannot go on; the message says why."""


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", flush=True)


# -- the database ---------------------------------------------------------------------------------------------


class Database:
    """The benchmark's own PostgreSQL database (its name must start with ``prefix``: it is dropped afterwards)."""

    def __init__(self, server_url: str, name: str, prefix: str = "finstack_bench"):
        if not name.startswith(prefix):
            raise BenchError(f"--database must start with {prefix}, not {name!r}: it is dropped afterwards.")
        self.server_url = server_url.rstrip("/")
        self.name = name
        self.url = f"{self.server_url}/{name}"

    def admin(self, statement: str) -> None:
        connection = psycopg2.connect(f"{self.server_url}/postgres", connect_timeout=5)
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            connection.close()

    def exists(self) -> bool:
        connection = psycopg2.connect(f"{self.server_url}/postgres", connect_timeout=5)
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.name,))
                return cursor.fetchone() is not None
        finally:
            connection.close()

    def create(self) -> None:
        self.drop()
        self.admin(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def query(self, statement: str, parameters=None, autocommit: bool = False) -> list[tuple]:
        connection = psycopg2.connect(self.url, connect_timeout=5, options="-c timezone=UTC")
        connection.autocommit = autocommit
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement, parameters)
                rows = cursor.fetchall() if cursor.description else []
            if not autocommit:
                connection.commit()
            return rows
        finally:
            connection.close()

    def scalar(self, statement: str, parameters=None):
        return self.query(statement, parameters)[0][0]

    def task_count(self) -> int:
        return self.scalar("SELECT count(*) FROM tasks")


# -- the app: environment, flask commands, gunicorn -----------------------------------------------------------


class App:
    """The production settings the app runs with here, and the `flask` commands and gunicorn servers using them.

    ``name`` tells the runs apart (temporary folder, rate-limit key prefix); logs go to ``out``.
    """

    def __init__(self, args, database: Database, name: str = "bench", out: Path = OUT):
        self.args = args
        self.out = out
        self.instance = Path(tempfile.mkdtemp(prefix=f"finstack-{name}-"))
        self.redis_url = args.redis_url
        self.redis_prefix = f"finstack-{name}-{secrets.token_hex(4)}"
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("ADMIN_", "GUNICORN_CMD_ARGS"))}
        self.env = environment | {
            "APP_ENV": "production",
            "DATABASE_URL": database.url,
            "SECRET_KEY": secrets.token_urlsafe(48),
            "JWT_SECRET_KEY": secrets.token_urlsafe(48),
            "AUTO_MIGRATE": "false",
            "FLASK_SKIP_DOTENV": "1",
            "INSTANCE_PATH": str(self.instance),
            # Production's log: a JSON line per request at INFO (in bench/out/gunicorn-*.log here), paid for as there.
            "LOG_LEVEL": "INFO",
            "TRUSTED_PROXY_COUNT": "0",
            # Limits stay on and counted in Redis, as in production, but far above what the load sends.
            "RATELIMIT_ENABLED": "true",
            "RATELIMIT_STORAGE_URI": self.redis_url,
            "RATELIMIT_KEY_PREFIX": self.redis_prefix,
            "RATELIMIT_DEFAULT": "1000000 per minute",
            "RATELIMIT_LOGIN": "1000 per minute",
            "RATELIMIT_REGISTER": "1000 per minute",
            "RATELIMIT_REFRESH": "1000 per minute",
            # Production refuses to start with metrics on and no token for Prometheus (ignored by builds without),
            # and the workers' metric files go in the run's own folder, removed by cleanup() (even after
            # `gunicorn --print-config`, which makes a folder of its own otherwise and never removes it).
            "METRICS_TOKEN": secrets.token_urlsafe(32),
            "PROMETHEUS_MULTIPROC_DIR": str(self.instance / "metrics"),
            # No scenario here sends email (bench/outbox.py measures the outbox, with a broker, workers and a mail
            # server); production refuses to start without those unless email is disabled.
            "MAIL_BACKEND": "disabled",
            "PYTHONUNBUFFERED": "1",
        }
        (self.instance / "metrics").mkdir()

    def flask(self, *command: str, log_name: str, env: dict | None = None) -> str:
        """Run a `flask` command with the app's settings (``env`` overrides some), its output in ``log_name``."""
        with open(self.out / log_name, "a") as output:
            output.write(f"$ flask {' '.join(command)}\n")
            output.flush()
            finished = subprocess.run(
                [str(BIN / "flask"), *command],
                cwd=ROOT,
                env=self.env | (env or {}),
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        if finished.returncode:
            tail = (self.out / log_name).read_text()[-2000:]
            raise BenchError(f"`flask {' '.join(command)}` failed (exit {finished.returncode}):\n{tail}")
        return (self.out / log_name).read_text()

    def has_seed_demo(self) -> bool:
        finished = subprocess.run(
            [str(BIN / "flask"), "seed-demo", "--help"], cwd=ROOT, env=self.env, capture_output=True, text=True
        )
        return finished.returncode == 0

    def gunicorn_command(self, port: int, overrides: list[str], minimal: bool = False) -> list[str]:
        """gunicorn serving the API, or with ``minimal`` bench/minimal_app.py with the API's worker settings."""
        if not (ROOT / "gunicorn.conf.py").exists():
            config = ["--workers", "2"]
        elif minimal:
            config = ["-c", str(BENCH / "minimal_gunicorn.py")]
        else:
            config = ["-c", "gunicorn.conf.py"]
        target = ["--pythonpath", str(BENCH), MINIMAL_APP] if minimal else ["app:app"]
        return [
            str(BIN / "gunicorn"),
            *config,
            "--bind",
            f"127.0.0.1:{port}",
            "--no-control-socket",
            *overrides,
            *target,
        ]

    def gunicorn_settings(self, overrides: list[str], keys: tuple[str, ...] = GUNICORN_KEYS) -> dict:
        """Workers, worker class and threads (or ``keys``) as gunicorn resolves them (config file, then the flags)."""
        finished = subprocess.run(
            [*self.gunicorn_command(0, overrides)[:-1], "--print-config", "app:app"],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        settings = {}
        for line in finished.stdout.splitlines():
            key, _, value = line.partition("=")
            if key.strip() in keys:
                settings[key.strip()] = value.strip()
        return settings

    def cleanup(self) -> None:
        shutil.rmtree(self.instance, ignore_errors=True)
        try:
            import redis

            client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
            keys = list(client.scan_iter(match=f"*{self.redis_prefix}*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        except Exception as error:  # cleanup is best effort; say so
            log(f"Could not remove the rate-limit keys {self.redis_prefix}* from Redis: {error}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """gunicorn serving the app (or with ``minimal`` bench/minimal_app.py) on 127.0.0.1, in its own process group,
    stopped on exit."""

    def __init__(self, app: App, label: str, overrides: list[str], minimal: bool = False):
        self.app = app
        self.label = label
        self.overrides = overrides
        self.minimal = minimal
        self.ready_path = "/api/tasks" if minimal else "/api/health"  # the minimal app has that route only
        self.port = app.args.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = app.out / f"gunicorn-{label}.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        command = self.app.gunicorn_command(self.port, self.overrides, self.minimal)
        self.log_file = open(self.log_path, "w")  # closed in stop()
        self.log_file.write("$ " + " ".join(command) + "\n")
        self.log_file.flush()
        environment = self.app.env | {"PORT": str(self.port), "HOST": "127.0.0.1"}
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=environment, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"gunicorn exited at start ({self.process.returncode}):\n{self.log_tail()}")
            try:
                status, _ = http(self, "GET", self.ready_path, timeout=2)
                if status == 200:
                    return self
            except (OSError, ValueError):  # not listening yet, or an answer that is not JSON (an error page)
                pass
            time.sleep(0.2)
        raise BenchError(f"gunicorn did not answer {self.ready_path} within 60 s:\n{self.log_tail()}")

    def __exit__(self, *_exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()  # the master stops its workers gracefully
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        # A worker the master could not stop: the process group is this server's alone (start_new_session).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None
        self.log_file.close()

    def log_tail(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text()[-3000:]


def http(server: Server, method: str, path: str, token: str | None = None, body=None, timeout: float = 30):
    """(status, parsed JSON) of one request to the server."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.url + path, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def checked(server: Server, method: str, path: str, token: str | None = None, body=None):
    status, answer = http(server, method, path, token, body)
    if not 200 <= status < 300:
        raise BenchError(f"Setting up: {method} {path} answered {status}: {json.dumps(answer)[:500]}")
    return answer


def login(server: Server) -> str:
    answer = checked(server, "POST", "/api/auth/login", body={"username": ADMIN, "password": DEMO_PASSWORD})
    return answer["access_token"]


# -- seeding --------------------------------------------------------------------------------------------------


def prepare(app: App, database: Database) -> None:
    log(f"Creating database {database.name} and applying the migrations")
    database.create()
    app.flask("db", "upgrade", log_name="setup.log")


def seed_to(app: App, database: Database, size: int, users: int) -> float:
    """Add demo tasks until the table holds ``size`` (seed-demo adds to what is there); seconds taken."""
    have = database.task_count()
    slack = max(5000, size // 50)  # tasks created by the scenarios of an earlier size or run (--reuse-db)
    if have > size + slack:
        raise BenchError(f"The database already holds {have:,} tasks, more than {size:,}: give --sizes in order.")
    started = time.perf_counter()
    if have < size:
        log(f"Seeding {size - have:,} tasks (to {size:,}) with flask seed-demo")
        app.flask(
            "seed-demo", "--users", str(users), "--tasks", str(size - have), "--seed", str(size),
            log_name="seed.log", env=DEMO_SEEDING,
        )  # fmt: skip
    seeded = time.perf_counter() - started
    log("VACUUM ANALYZE and CHECKPOINT")
    database.query("VACUUM (ANALYZE)", autocommit=True)
    database.query("CHECKPOINT", autocommit=True)
    count = database.task_count()
    if not size <= count <= max(have, size):
        raise BenchError(f"After seeding the database holds {count:,} tasks, not {size:,}.")
    log(f"{count:,} tasks ready ({seeded:.0f} s seeding)")
    return seeded


# -- scenarios ------------------------------------------------------------------------------------------------


def partial_fragment(entity_name: str) -> str:
    """A few letters from inside a client's name ("Hartmann Holdings" -> "artm"), as a person searching types."""
    words = re.findall(r"[^\W\d_]{4,}", entity_name)
    word = words[0] if words else entity_name
    return word[1:5].lower()


def pick_fragment(database: Database, share: float = PARTIAL_SHARE) -> tuple[str, int, int]:
    """Four letters found in about ``share`` of the live tasks' entity names, picked from the data at hand, as a
    person searching types them; with the number of tasks they match (counted as the API's filter counts:
    ``lower(entity_name) LIKE '%...%'``) and the number of live tasks. The benchmark's own creations are not
    searched for."""
    per_name = database.query("SELECT entity_name, count(*) FROM tasks WHERE deleted_at IS NULL GROUP BY 1")
    live = sum(count for _, count in per_name)
    found: dict[str, int] = {}
    for name, count in per_name:
        words = re.findall(r"[a-z]{4,}", name.lower())
        for fragment in {word[i : i + 4] for word in words for i in range(len(word) - 3)}:
            found[fragment] = found.get(fragment, 0) + count
    candidates = [fragment for fragment in found if fragment not in CREATE_MARK.lower()]
    if not candidates:
        raise BenchError("No entity name has a word of four letters or more to search for.")
    fragment = min(candidates, key=lambda fragment: (abs(found[fragment] - share * live), fragment))
    matches = database.scalar(
        "SELECT count(*) FROM tasks WHERE deleted_at IS NULL AND lower(entity_name) LIKE %s", (f"%{fragment}%",)
    )
    return fragment, matches, live


def build_scenarios(server: Server, database: Database, token: str) -> list[Scenario]:
    """Every scenario, with ids, filters and cursors taken from the data at hand."""
    total = database.task_count()
    ids = [str(row[0]) for row in database.query("SELECT id FROM tasks ORDER BY id LIMIT 1003")]
    if len(ids) < 1003:
        raise BenchError(f"The benchmark needs at least 1,003 tasks, not {total:,}.")
    single, updated, patched, bulk = ids[0], ids[1], ids[2], ids[3:]
    assignee = database.scalar(
        "SELECT contact_person_id FROM tasks WHERE contact_person_id IS NOT NULL "
        "GROUP BY contact_person_id ORDER BY count(*) DESC, contact_person_id LIMIT 1"
    )
    task_type = database.scalar("SELECT task_type FROM tasks GROUP BY task_type ORDER BY count(*) DESC LIMIT 1")
    fragment, matches, live = pick_fragment(database)
    quantile = "SELECT date_created FROM tasks ORDER BY date_created OFFSET %s LIMIT 1"
    date_from = database.scalar(quantile, (int(total * 0.45),)).date().isoformat()
    date_to = database.scalar(quantile, (int(total * 0.55),)).date().isoformat()
    admin_id = checked(server, "GET", "/api/auth/me", token)["user"]["id"]
    deep_page = max(2, total // PER_PAGE // 2)

    def query(**params) -> str:
        return "/api/tasks?" + urllib.parse.urlencode(params)

    def body(**fields) -> str:
        return json.dumps(fields)

    scenarios = [
        Scenario("health", "GET /api/health (no token)", "GET", "/api/health", auth=False),
        Scenario("list_default", "GET /api/tasks (page 1, date_created desc)", "GET", "/api/tasks"),
        Scenario("list_status", "status=open", "GET", query(status="open")),
        Scenario("list_assignee", "contact_person_id=<busiest assignee>", "GET", query(contact_person_id=assignee)),
        Scenario("list_task_type", f"task_type={task_type.lower()}", "GET", query(task_type=task_type.lower())),
        Scenario(
            "list_partial",
            f"entity_name={fragment} (partial match: {matches:,} tasks, {matches / live:.1%})",
            "GET",
            query(entity_name=fragment),
            expect_total=matches,
        ),
        Scenario(
            "list_dates",
            f"date_from={date_from}&date_to={date_to} (middle 10 %)",
            "GET",
            query(date_from=date_from, date_to=date_to),
        ),
        *(
            Scenario(f"sort_{name}", f"sort_by={name}&sort_order=asc", "GET", query(sort_by=name, sort_order="asc"))
            for name in SORT_FIELDS
        ),
        Scenario(
            "page_deep", f"page={deep_page:,} (offset {(deep_page - 1) * PER_PAGE:,})", "GET", query(page=deep_page)
        ),
    ]
    first = checked(server, "GET", "/api/tasks", token)["pagination"]
    deep = checked(server, "GET", query(page=deep_page), token)["pagination"]
    for name, shown, pagination in (
        ("cursor_page", "cursor=<next_cursor of page 1>", first),
        ("cursor_deep", f"cursor=<next_cursor of page {deep_page:,}>", deep),
    ):
        if "next_cursor" not in pagination:
            scenarios.append(Scenario(name, shown, "GET", "", skip="this build's list has no pagination.next_cursor"))
        elif pagination["next_cursor"] is None:
            scenarios.append(Scenario(name, shown, "GET", "", skip="next_cursor was null (last page)"))
        else:
            scenarios.append(Scenario(name, shown, "GET", query(cursor=pagination["next_cursor"])))
    create = body(
        entity_name=CREATE_MARK,
        task_type="Call",
        task_time="2026-01-15T10:00:00Z",
        contact_person_id=admin_id,
        note="",
    )
    scenarios += [
        Scenario("task_get", "GET /api/tasks/<id>", "GET", f"/api/tasks/{single}"),
        Scenario("create", "POST /api/tasks", "POST", "/api/tasks", [create]),
        Scenario(
            "update",
            "PUT /api/tasks/<id> {note} (two notes in turn)",
            "PUT",
            f"/api/tasks/{updated}",
            [body(note="Benchmark note A"), body(note="Benchmark note B")],
        ),
        Scenario(
            "status_patch",
            "PATCH /api/tasks/<id>/status (closed/open in turn)",
            "PATCH",
            f"/api/tasks/{patched}/status",
            [body(status="closed"), body(status="open")],
        ),
        Scenario(
            "bulk_status",
            "PATCH /api/tasks/bulk-status, 1,000 ids (closed/open in turn)",
            "PATCH",
            "/api/tasks/bulk-status",
            [body(task_ids=bulk, status="closed"), body(task_ids=bulk, status="open")],
        ),
        Scenario("dashboard", "GET /api/analytics/dashboard", "GET", "/api/analytics/dashboard"),
    ]
    return scenarios


def check_reads(server: Server, scenarios: list[Scenario], token: str) -> dict[str, int | None]:
    """Every read answers 2xx once before it is timed (writes are checked by wrk's count of non-2xx); the
    pagination.total of those whose exact total is known beforehand, by name."""
    totals = {}
    for scenario in scenarios:
        if not scenario.skip and not scenario.bodies:
            answer = checked(server, scenario.method, scenario.path, token if scenario.auth else None)
            if scenario.expect_total is not None:
                totals[scenario.name] = (answer.get("pagination") or {}).get("total")
    return totals


# -- load -----------------------------------------------------------------------------------------------------


def wrk(server: Server, scenario: Scenario, token: str, clients: int, seconds: int) -> dict:
    """One wrk run of the scenario; its counts and latencies (ms), and an error when anything was not 2xx."""
    bodies = ""
    if scenario.bodies:
        path = OUT / "bodies" / f"{scenario.name}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(scenario.bodies) + "\n")
        bodies = str(path)
    environment = os.environ | {
        "BENCH_METHOD": scenario.method,
        "BENCH_PATH": scenario.path,
        "BENCH_TOKEN": token if scenario.auth else "",
        "BENCH_BODIES": bodies,
    }
    command = ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--timeout", "10s", "--latency", "-s", str(LUA)]
    finished = subprocess.run(
        [*command, server.url], env=environment, capture_output=True, text=True, timeout=seconds + 60
    )
    line = next((line for line in finished.stdout.splitlines() if line.startswith("BENCH_RESULT ")), None)
    if finished.returncode or line is None:
        raise BenchError(
            f"wrk failed for {scenario.name} ({finished.returncode}): {finished.stderr or finished.stdout}"
        )
    raw = json.loads(line.removeprefix("BENCH_RESULT "))
    seconds_run = raw["duration_us"] / 1e6
    result = {
        "clients": clients,
        "requests": raw["requests"],
        "rps": raw["requests"] / seconds_run if seconds_run else 0.0,
        "p50": raw["p50_us"] / 1000,
        "p95": raw["p95_us"] / 1000,
        "p99": raw["p99_us"] / 1000,
        "max": raw["max_us"] / 1000,
        "error": None,
    }
    socket_errors = sum(raw[key] for key in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    if raw["non2xx"] or socket_errors:
        result["error"] = (
            f"{raw['non2xx']} of {raw['requests']} answers not 2xx, {socket_errors} socket errors/timeouts"
            + (f"; first: {raw['first_non2xx'][:200]}" if raw["first_non2xx"] else "")
        )
    return result


def measure(server: Server, scenario: Scenario, token: str, clients: int, seconds: int, warmup: int) -> dict:
    if warmup:
        wrk(server, scenario, token, clients, warmup)
    result = wrk(server, scenario, token, clients, seconds)
    verdict = f"FAILED: {result['error']}" if result["error"] else ""
    log(
        f"  {scenario.name:<15} c={clients:<2} {result['rps']:8.1f} req/s  p50 {result['p50']:8.2f}  "
        f"p95 {result['p95']:8.2f}  p99 {result['p99']:8.2f} ms  {verdict}"
    )
    if result["error"]:
        print(f"\n!!! {scenario.name} FAILED: {result['error']}\n", file=sys.stderr, flush=True)
    return result


def scenario_spec(scenarios: list[Scenario], token: str, path: Path, names=None) -> Path:
    """The scenarios (with the token) as JSON for the in-process programs: all that were not skipped, or ``names``."""
    spec = [
        asdict(scenario) | {"token": token if scenario.auth else None}
        for scenario in scenarios
        if not scenario.skip and (names is None or scenario.name in names)
    ]
    path.write_text(json.dumps(spec, indent=1))
    return path


def in_process(app: App, program: str, *arguments: str, log_name: str) -> None:
    """Run bench/PROGRAM with the app's settings; what the app logs (a line per request, at INFO as in production)
    goes to bench/out/LOG_NAME, the program's progress to the terminal."""
    with open(OUT / log_name, "w") as app_log:
        finished = subprocess.run(
            [sys.executable, str(BENCH / program), *arguments], cwd=ROOT, env=app.env, stderr=app_log
        )
    if finished.returncode:
        tail = (OUT / log_name).read_text()[-2000:]
        raise BenchError(f"bench/{program} failed ({finished.returncode}); the end of bench/out/{log_name}:\n{tail}")


def sql_times(app: App, scenarios: list[Scenario], token: str, runs: int, size: int) -> dict:
    """PostgreSQL's own time for each scenario's statements (bench/sqltime.py, in its own process)."""
    spec_path, output = scenario_spec(scenarios, token, OUT / f"scenarios-{size}.json"), OUT / f"sql-{size}.json"
    log(f"Timing each request's SQL under EXPLAIN ANALYZE ({runs} runs per statement), and the app in-process")
    in_process(app, "sqltime.py", str(spec_path), str(output), "--runs", str(runs), log_name=f"sqltime-{size}.log")
    return json.loads(output.read_text())


def profile(args, app: App, scenarios: list[Scenario], token: str, size: int, tasks: int) -> Path:
    """Each targeted scenario's time by category, in-process under cProfile (bench/profiler.py): bench/profile.md,
    or bench/out/profile.md from a quick run."""
    output = (OUT if args.quick else BENCH) / "profile.md"
    spec_path = scenario_spec(scenarios, token, OUT / f"profile-scenarios-{size}.json", names=PROFILED)
    log(f"Profiling in-process: {args.profile_requests} requests (at most {args.profile_seconds} s) per scenario")
    in_process(
        app,
        "profiler.py",
        str(spec_path),
        str(output),
        "--requests",
        str(args.profile_requests),
        "--seconds",
        str(args.profile_seconds),
        "--prof-prefix",
        str(OUT / f"profile-{size}"),
        "--tasks",
        str(tasks),
        log_name=f"profile-{size}.log",
    )
    log(f"Wrote {output.relative_to(ROOT)}")
    return output


# -- the runs -------------------------------------------------------------------------------------------------


def gunicorn_overrides(args) -> list[str]:
    overrides = []
    if args.workers:
        overrides += ["--workers", str(args.workers)]
    if args.worker_class:
        overrides += ["--worker-class", args.worker_class]
    if args.threads:
        overrides += ["--threads", str(args.threads)]
    return overrides


def busy_machine_warning() -> float:
    """The 1-minute load average before a load run; other work on the machine makes every number noisier."""
    load = os.getloadavg()[0]
    if load > 0.5:
        log(f"Warning: load average {load:.2f} before the run: something else is using the CPU, numbers will be noisy")
    return load


def measure_minimal(args, app: App, size: int, overrides: list[str]) -> dict:
    """bench/minimal_app.py's list, served as the API is: p50 with one client, and the rate with --clients."""
    log(f"The minimal app (bench/minimal_app.py) at {size:,} tasks, served with the API's gunicorn settings")
    page = Scenario("minimal_list", "GET /api/tasks of bench/minimal_app.py", "GET", "/api/tasks", auth=False)
    with Server(app, f"minimal-{size}", overrides, minimal=True) as server:
        one = measure(server, page, "", 1, args.duration, args.warmup)
        many = measure(server, page, "", args.clients, args.concurrency_duration, args.warmup)
    return {"c1": one, "cN": many}


def bench_size(args, app: App, database: Database, size: int, overrides: list[str], last: bool) -> dict:
    """One size: the minimal app, then the API, one after the other; SQL times, and at the ``last`` size the
    other endpoints with --clients clients and the profile."""
    seeded_s = seed_to(app, database, size, args.users)
    load = busy_machine_warning()
    minimal = measure_minimal(args, app, size, overrides)
    with Server(app, f"{size}", overrides) as server:
        token = login(server)
        scenarios = build_scenarios(server, database, token)
        totals = check_reads(server, scenarios, token)
        log(f"Load at {size:,} tasks: {args.duration} s per scenario after {args.warmup} s of warm-up, 1 client")
        loads = {}
        for scenario in scenarios:
            if scenario.skip:
                log(f"  {scenario.name:<15} skipped: {scenario.skip}")
                continue
            loads[scenario.name] = measure(server, scenario, token, 1, args.duration, args.warmup)
        by_name = {scenario.name: scenario for scenario in scenarios}
        crowd = (token, args.clients, args.concurrency_duration, args.warmup)
        concurrent = measure(server, by_name["list_default"], *crowd)
        concurrent_too = {
            name: measure(server, by_name[name], *crowd)
            for name in CONCURRENT_TOO
            if last and name in by_name and not by_name[name].skip
        }
    sql = sql_times(app, scenarios, token, args.sql_runs, size)
    tasks = database.task_count()
    profiled = profile(args, app, scenarios, token, size, tasks) if last and args.profile_requests else None
    rows = []
    for scenario in scenarios:
        row = {
            "name": scenario.name,
            "shown": scenario.shown,
            "method": scenario.method,
            "target_ratio": scenario.target_ratio,
            "skip": scenario.skip,
        }
        if scenario.expect_total is not None:
            row["expect_total"], row["total"] = scenario.expect_total, totals.get(scenario.name)
        row.update(loads.get(scenario.name, {}))
        if scenario.name in sql:
            detail = sql[scenario.name]["detail"]
            row["sql_ms"] = sql[scenario.name]["sql_ms"]
            row["statements"] = sql[scenario.name]["statements"]
            row["app_ms"] = sql[scenario.name]["app_ms"]
            slowest = max(detail, key=lambda item: item["ms"]) if detail else None
            if slowest:
                row["slowest_sql"] = {k: slowest[k] for k in ("statement", "ms", "hottest")}
        rows.append(row)
    return {
        "size": size,
        "tasks": tasks,
        "seed_s": seeded_s,
        "load_before": load,
        "minimal": minimal,
        "scenarios": rows,
        "concurrent": concurrent,
        "concurrent_too": concurrent_too,
        "profile": str(profiled.relative_to(ROOT)) if profiled else None,
    }


def profile_only(args, app: App, database: Database, overrides: list[str]) -> int:
    """--profile-only: bench/profile.md at the largest size, without the load (a quicker loop while working on the
    app; the server is needed only to sign in and to take cursors)."""
    size = max(args.sizes)
    seed_to(app, database, size, args.users)
    with Server(app, f"{size}", overrides) as server:
        token = login(server)
        scenarios = build_scenarios(server, database, token)
        check_reads(server, scenarios, token)
    print(profile(args, app, scenarios, token, size, database.task_count()).read_text())
    return 0


def parse_worker_configs(text: str) -> list[tuple[str, list[str]]]:
    """Parse "sync:3,gthread:2x4" into [("sync w=3", flags), ("gthread w=2 t=4", flags)]."""
    configs = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\w+):(\d+)(?:x(\d+))?\s*", item)
        if not match:
            raise BenchError(f"--compare-workers: {item!r} is not CLASS:WORKERS or CLASS:WORKERSxTHREADS")
        worker_class, workers, threads = match.group(1), match.group(2), match.group(3) or "1"
        label = f"{worker_class} w={workers}" + (f" t={threads}" if threads != "1" else "")
        configs.append((label, ["--worker-class", worker_class, "--workers", workers, "--threads", threads]))
    return configs


def compare_workers(args, app: App, database: Database) -> list[dict]:
    size = max(args.sizes)
    seed_to(app, database, size, args.users)
    rows = []
    for label, overrides in parse_worker_configs(args.compare_workers):
        slug = re.sub(r"\W+", "-", label)
        log(f"gunicorn {label}")
        with Server(app, f"workers-{slug}", overrides) as server:
            token = login(server)
            default = Scenario("list_default", "GET /api/tasks", "GET", "/api/tasks")
            one = measure(server, default, token, 1, args.duration, args.warmup)
            many = measure(server, default, token, args.clients, args.duration, args.warmup)
        rows.append({"label": label, "settings": app.gunicorn_settings(overrides), "c1": one, "cN": many})
    return rows


def machine_info(database: Database, app: App, overrides: list[str], keys: tuple[str, ...] = GUNICORN_KEYS) -> dict:
    """The machine, the versions and the gunicorn settings a run had (shared with bench/soak.py)."""

    def first(path: str, key: str) -> str:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "unknown"

    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    # What this run writes itself (the profile comes before this) does not count as a change of the code measured.
    written = ("bench/results.md", "bench/results.png", "bench/profile.md", "docs/performance.md")
    outputs = [f":!{path}" for path in written]
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", *outputs)
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("[")[0].strip()
    pg = {name: database.scalar(f"SHOW {name}") for name in ("server_version", "shared_buffers", "work_mem")}
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else ""),
        "cpus": os.cpu_count(),
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "memory": first("/proc/meminfo", "MemTotal"),
        "postgres": pg,
        "python": sys.version.split()[0],
        "wrk": wrk_version,
        "gunicorn": app.gunicorn_settings(overrides, keys),
        "gunicorn_conf": (ROOT / "gunicorn.conf.py").exists(),
        "overridden": bool(overrides),
    }


def machine(args, database: Database, app: App, overrides: list[str]) -> dict:
    return machine_info(database, app, overrides) | {
        "duration": args.duration,
        "warmup": args.warmup,
        "clients": args.clients,
        "concurrency_duration": args.concurrency_duration,
        "sql_runs": args.sql_runs,
        "users": args.users,
        "log_level": app.env["LOG_LEVEL"],
        "target_ratios": TARGET_RATIOS,
        "throughput_ratio": THROUGHPUT_RATIO,
        "concurrent_too": list(CONCURRENT_TOO),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Benchmark the API on PostgreSQL with gunicorn and wrk.",
        epilog="Needs wrk (apt-get install wrk; `make bench` installs it), PostgreSQL and Redis.",
    )
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"task counts, ascending (default {DEFAULT_SIZES})")
    parser.add_argument("--duration", type=int, default=5, help="seconds per scenario (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of untimed load first (default 1)")
    parser.add_argument("--clients", type=int, default=16, help="clients of the concurrent run (default 16)")
    parser.add_argument("--concurrency-duration", type=int, default=10, help="seconds of the concurrent run")
    parser.add_argument("--sql-runs", type=int, default=7, help="EXPLAIN ANALYZE runs per statement (default 7)")
    parser.add_argument("--users", type=int, default=50, help="demo users the tasks are spread over (default 50)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 tasks, 1 s each; writes bench/out/")
    parser.add_argument(
        "--compare-workers",
        nargs="?",
        const=DEFAULT_WORKER_CONFIGS,
        metavar="CONFIGS",
        help=f"only the default list at 1 and --clients clients per gunicorn setup (default {DEFAULT_WORKER_CONFIGS})"
        ", on the largest size; writes bench/workers.md",
    )
    parser.add_argument("--workers", type=int, help="gunicorn --workers (default: gunicorn.conf.py's)")
    parser.add_argument("--worker-class", help="gunicorn --worker-class, e.g. sync or gthread")
    parser.add_argument("--threads", type=int, help="gunicorn --threads (gthread)")
    parser.add_argument("--database", default="finstack_bench", help="database name (must start with finstack_bench)")
    parser.add_argument(
        "--postgres", default=os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--port", type=int, help="port for gunicorn (default: a free one)")
    parser.add_argument("--keep-db", action="store_true", help="keep the database afterwards (for --reuse-db)")
    parser.add_argument("--reuse-db", action="store_true", help="start from the database as kept by --keep-db")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the reports from bench/out/results.json; no load"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed, not only on errors")
    parser.add_argument(
        "--profile-requests", type=int, default=200, help="requests per scenario in bench/profile.md (0: no profile)"
    )
    parser.add_argument("--profile-seconds", type=float, default=10, help="at most this long per profiled scenario")
    parser.add_argument(
        "--profile-only", action="store_true", help="only bench/profile.md, at the largest size: no load, no report"
    )
    parser.add_argument(
        "--original",
        type=Path,
        metavar="JSON",
        help="figures of the original app measured by bench/load.py (its --json output) for the report's "
        "comparison, instead of those issue 14 recorded",
    )
    args = parser.parse_args(argv)
    if args.quick:
        if args.sizes == DEFAULT_SIZES:
            args.sizes = "2000"
        args.duration, args.warmup, args.concurrency_duration, args.sql_runs = 1, 1, 2, 3
        args.profile_requests, args.profile_seconds = min(args.profile_requests, 30), min(args.profile_seconds, 2)
    args.sizes = [int(size.replace("_", "")) for size in args.sizes.split(",")]
    if args.sizes != sorted(args.sizes):
        parser.error("--sizes must be ascending: each size adds tasks to the one before")
    return args


def write_reports(args, results: dict) -> None:
    stem = "quick-results" if args.quick else "results"
    folder = OUT if args.quick else BENCH
    (OUT / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (folder / f"{stem}.md").write_text(report.results_markdown(results, chart=f"{stem}.png"))
    report.chart(results, folder / f"{stem}.png")
    log(f"Wrote {(folder / f'{stem}.md').relative_to(ROOT)} and {stem}.png")
    if not args.quick:
        report.update_table(ROOT / "docs" / "performance.md", report.table_section(results))


def clean_up(args, database: Database, app: App) -> None:
    """What a run leaves behind: nothing, unless --keep-db kept the database for a look."""
    if args.keep_db:
        log(f"Kept database {database.name} (drop it with: dropdb -h 127.0.0.1 -U postgres {database.name})")
    else:
        database.drop()
    app.cleanup()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        results = json.loads((OUT / ("quick-results.json" if args.quick else "results.json")).read_text())
        if args.original:
            results["original"] = report.original_figures(args.original)
        write_reports(args, results)
        return 0
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed: apt-get install wrk (make bench does it).")
    OUT.mkdir(exist_ok=True)
    for stale in ("setup.log", "seed.log"):
        (OUT / stale).unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below when stopped
    database = Database(args.postgres, args.database)
    app = App(args, database)
    overrides = gunicorn_overrides(args)
    started = time.perf_counter()
    try:
        if args.reuse_db and database.exists():
            log(f"Reusing database {database.name} ({database.task_count():,} tasks); applying migrations")
            app.flask("db", "upgrade", log_name="setup.log")
        else:
            prepare(app, database)
        if not app.has_seed_demo():
            raise BenchError("This build has no `flask seed-demo` command, which the benchmark seeds with.")
        if args.profile_only:
            return profile_only(args, app, database, overrides)
        if args.compare_workers:
            rows = compare_workers(args, app, database)
            info = machine(args, database, app, overrides)
            path = (OUT / "workers.md") if args.quick else (BENCH / "workers.md")
            path.write_text(report.workers_markdown(rows, info, max(args.sizes), args.clients))
            print(path.read_text())
            log(f"Wrote {path.relative_to(ROOT)} in {time.perf_counter() - started:.0f} s")
            return 1 if any(row["c1"]["error"] or row["cN"]["error"] for row in rows) else 0
        sizes = [bench_size(args, app, database, size, overrides, size == args.sizes[-1]) for size in args.sizes]
        info = machine(args, database, app, overrides)
        info["total_s"] = time.perf_counter() - started
        results = {"meta": info, "sizes": sizes, "original": report.original_figures(args.original)}
        write_reports(args, results)
        heading = f"Targets at {sizes[-1]['size']:,} tasks (issue 14; set for 1,000,000)"
        print("\n".join(["", heading, "", *report.targets_table(results), ""]), flush=True)
        errors = [row["name"] for size in sizes for row in size["scenarios"] if row.get("error")]
        errors += [f"concurrent@{size['size']}" for size in sizes if size["concurrent"]["error"]]
        for size in sizes:
            runs = [(f"{name} c={run['clients']}", run) for name, run in size["concurrent_too"].items()]
            runs += [(f"minimal app c={run['clients']}", run) for run in size["minimal"].values()]
            errors += [f"{label}@{size['size']}" for label, run in runs if run["error"]]
        if errors:
            print(f"\n!!! FAILED scenarios (answers outside 2xx): {', '.join(errors)}", file=sys.stderr)
            return 1
        missed = report.missed_targets(results)
        if missed:
            print(f"{len(missed)} targets missed at {args.sizes[-1]:,} tasks (see the report): " + "; ".join(missed))
            return 1 if args.strict else 0
        return 0
    finally:
        clean_up(args, database, app)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        sys.exit(2)
