"""Where a request's time goes: PostgreSQL's own time for the statements it sends, and the app's time in-process.

Run by bench/run.py in its own process, with the same environment as the benchmarked gunicorn:
    python bench/sqltime.py SCENARIOS.json OUTPUT.json --runs 7

For each scenario it builds the app in-process and sends the request once through Flask's test client,
recording every statement it sends (a SQLAlchemy ``before_cursor_execute`` listener). Each recorded statement
then runs with its parameters under ``EXPLAIN (ANALYZE, TIMING OFF)`` ``--runs`` times after one warm-up,
inside a transaction that is rolled back, so writes change nothing. A statement's time is the median of
planning + execution time (triggers included); a request's SQL time is the sum over its statements. One more
run with per-node timing and buffers keeps the plan, so the report can say where a slow statement spends it.

Then the request is sent again through the test client for a second (at least ``2 x --runs`` times, its
bodies in turn): the median is the app's own time, the whole Flask stack with its SQL and the rate limiter's
Redis calls but without HTTP and gunicorn. Where that time goes, by category: bench/profiler.py.
"""

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg2  # noqa: E402
import psycopg2.extras  # noqa: E402
from sqlalchemy import event  # noqa: E402

from app import create_app  # noqa: E402
from models import db  # noqa: E402

DML = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH")


class Request:
    """One scenario's request, sent through the test client; its bodies in turn, like wrk sends them."""

    def __init__(self, app, scenario: dict):
        self.client = app.test_client()
        self.scenario = scenario
        self.headers = {"Authorization": f"Bearer {scenario['token']}"} if scenario.get("token") else {}
        if scenario.get("bodies"):
            self.headers["Content-Type"] = "application/json"
        self.sent = 0

    def send(self) -> None:
        bodies = self.scenario.get("bodies") or [None]
        body = bodies[self.sent % len(bodies)]
        self.sent += 1
        response = self.client.open(
            self.scenario["path"], method=self.scenario["method"], headers=self.headers, data=body
        )
        if not 200 <= response.status_code < 300:
            raise SystemExit(
                f"{self.scenario['name']}: {self.scenario['method']} {self.scenario['path'][:100]} answered "
                f"{response.status_code} in-process: {response.get_data(as_text=True)[:300]}"
            )


def fresh_insert_id(statement: str, parameters):
    """The request committed its INSERT: timed again with the same id, it would hit the primary key."""
    if statement.lstrip().upper().startswith("INSERT") and isinstance(parameters, dict) and "id" in parameters:
        fresh = uuid.uuid4()
        return parameters | {"id": fresh if isinstance(parameters["id"], uuid.UUID) else str(fresh)}
    return parameters


def capture(engine, request: Request) -> list[tuple[str, object]]:
    """The DML statements (and their parameters) that one request sends."""
    statements: list[tuple[str, object]] = []

    def record(_conn, _cursor, statement, parameters, _context, executemany):
        if statement.lstrip().upper().startswith(DML):
            # executemany: the first row; but insertmanyvalues sends one statement with one dict for all the rows
            parameters = parameters[0] if executemany and isinstance(parameters, (list, tuple)) else parameters
            statements.append((statement, fresh_insert_id(statement, parameters)))

    event.listen(engine, "before_cursor_execute", record)
    try:
        request.send()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return statements


def explain(cursor, statement: str, parameters, options: str) -> dict:
    """One EXPLAIN ANALYZE of ``statement`` in a transaction that is rolled back; the plan as a dict."""
    cursor.execute("BEGIN")
    try:
        cursor.execute(f"EXPLAIN ({options}, FORMAT JSON) {statement}", parameters)
        return cursor.fetchone()[0][0]
    finally:
        cursor.execute("ROLLBACK")


def node_times(node: dict, found: list) -> float:
    """Walk a plan (with per-node timing), appending (exclusive ms, description) per node; its inclusive ms."""
    loops = node.get("Actual Loops", 1) or 1
    inclusive = node.get("Actual Total Time", 0.0) * loops
    children = sum(node_times(child, found) for child in node.get("Plans", []))
    text = node["Node Type"]
    if node.get("Relation Name"):
        text += f" on {node['Relation Name']}"
    if node.get("Index Name"):
        text += f" using {node['Index Name']}"
    found.append((max(inclusive - children, 0.0), f"{text} (rows {node.get('Actual Rows', 0) * loops:,.0f})"))
    return inclusive


def hottest_node(plan: dict) -> str:
    """The plan node that spends the most time by itself, e.g. "Seq Scan on tasks (rows 1,000,000): 80.1 ms"."""
    found: list = []
    node_times(plan["Plan"], found)
    triggers = plan.get("Triggers", [])
    if triggers:
        names = ", ".join(trigger["Trigger Name"] for trigger in triggers)
        found.append((sum(trigger.get("Time", 0.0) for trigger in triggers), f"triggers ({names})"))
    exclusive, text = max(found)
    return f"{text}: {exclusive:.1f} ms"


def sql_time(connection, statements: list, runs: int) -> list[dict]:
    results = []
    with connection.cursor() as cursor:
        for statement, parameters in statements:
            explain(cursor, statement, parameters, "ANALYZE, TIMING OFF")  # warm-up: caches, catalogue
            times = []
            for _ in range(runs):
                plan = explain(cursor, statement, parameters, "ANALYZE, TIMING OFF")
                times.append(plan["Planning Time"] + plan["Execution Time"])
            detailed = explain(cursor, statement, parameters, "ANALYZE, BUFFERS")
            results.append(
                {
                    "statement": " ".join(statement.split()),
                    "ms": statistics.median(times),
                    "min_ms": min(times),
                    "hottest": hottest_node(detailed),
                    "plan": detailed,
                }
            )
    return results


def app_time(request: Request, runs: int, seconds: float = 1.0, most: int = 500) -> float:
    """Median ms of the request through the test client (the app without HTTP and gunicorn): at least ``runs``
    requests and ``seconds`` of them, so a moment of CPU taken by something else does not decide the median."""
    request.send()  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < most and (len(times) < runs or time.perf_counter() < deadline):
        started = time.perf_counter()
        request.send()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    scenarios = json.loads(args.scenarios.read_text())

    app = create_app()  # the rate limiter included: it counts in the server's Redis keys, far below its limits
    psycopg2.extras.register_uuid()
    with app.app_context():
        engine = db.engine
        dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    connection = psycopg2.connect(dsn, options="-c timezone=UTC")
    connection.autocommit = True  # BEGIN and ROLLBACK are sent explicitly around each EXPLAIN

    output = {}
    try:
        for scenario in scenarios:
            request = Request(app, scenario)
            if len(scenario.get("bodies") or []) > 1:
                request.send()  # bodies alternate states: the captured request then really changes its rows
            timed = sql_time(connection, capture(engine, request), args.runs)
            in_process = app_time(request, 2 * args.runs)
            sql_ms = sum(item["ms"] for item in timed)
            output[scenario["name"]] = {
                "statements": len(timed),
                "sql_ms": sql_ms,
                "app_ms": in_process,
                "detail": timed,
            }
            print(
                f"  {scenario['name']:<18} {len(timed)} statements, SQL {sql_ms:8.2f} ms, "
                f"in-process {in_process:8.2f} ms",
                flush=True,
            )
    finally:
        connection.close()
        engine.dispose()
    args.output.write_text(json.dumps(output, indent=1, default=str))


if __name__ == "__main__":
    main()
