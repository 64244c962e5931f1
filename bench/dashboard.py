"""The dashboard at scale: its one statement under EXPLAIN, and the endpoint timed in-process, unfiltered and with
each filter. Writes the tables of bench/dashboard.md to stdout, and the plans to --plans.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/DB .venv/bin/python bench/dashboard.py [--calls 50]

The database is migrated and seeded first (`flask db upgrade`, `flask seed-demo --users 50 --tasks 1000000`,
`VACUUM ANALYZE`). Requests are made as demo0001 through Flask's test client, with rate limits off (they add
about 0.65 ms in Redis, see bench/notes.md). For each query: the statement the request sent (recorded with a
SQLAlchemy listener) runs under ``EXPLAIN (ANALYZE, TIMING OFF)`` --runs times after a warm-up, the median of
planning + execution is its SQL time; then the request itself --calls times, median and 90th percentile.
"""

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import event, func, select  # noqa: E402

from app import create_app  # noqa: E402
from models import Task, db  # noqa: E402

DEMO_USER, DEMO_PASSWORD = "demo0001", "demo-password"


def queries(app) -> list[tuple[str, str]]:
    """(name, query string): none, then each filter, then all of them at once."""
    with app.app_context():
        busiest = db.session.scalar(
            select(Task.contact_person_id)
            .where(Task.contact_person_id.is_not(None))
            .group_by(Task.contact_person_id)
            .order_by(func.count().desc())
            .limit(1)
        )
    return [
        ("unfiltered", ""),
        ("status=open", "status=open"),
        ("status=closed", "status=closed"),
        ("assignee", f"contact_person_id={busiest}"),
        ("task_type=call (22 %)", "task_type=call"),
        ("task_type=kyc (5 %)", "task_type=kyc"),
        ("entity_name=rani (partial)", "entity_name=rani"),
        ("date range (last 90 days)", f"date_from={(datetime.now(UTC) - timedelta(days=90)).date()}"),
        ("date range (a year, long ago)", "date_from=2024-01-01&date_to=2024-12-31"),
        ("assignee + status + type", f"contact_person_id={busiest}&status=open&task_type=call"),
    ]


def sql_ms(app, statement: str, parameters, runs: int) -> tuple[float, float, float]:
    """Median planning, execution and total ms of the statement under EXPLAIN (ANALYZE, TIMING OFF)."""
    plans = []
    with app.app_context(), db.engine.connect() as connection:
        cursor = connection.connection.cursor()
        for run in range(runs + 1):
            cursor.execute("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + statement, parameters)
            if run:
                plans.append(cursor.fetchone()[0][0])
        connection.rollback()
    planning = statistics.median(plan["Planning Time"] for plan in plans)
    execution = statistics.median(plan["Execution Time"] for plan in plans)
    return planning, execution, statistics.median(plan["Planning Time"] + plan["Execution Time"] for plan in plans)


def plan_text(app, statement: str, parameters) -> str:
    with app.app_context(), db.engine.connect() as connection:
        cursor = connection.connection.cursor()
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
        lines = [row[0] for row in cursor.fetchall()]
        connection.rollback()
    return "\n".join(lines)


def timed(client, query: str, headers: dict, calls: int) -> list[float]:
    """The ms of ``calls`` dashboard requests with this query string."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        assert client.get(f"/api/analytics/dashboard?{query}", headers=headers).status_code == 200
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="Requests per query for the in-process time.")
    parser.add_argument("--runs", type=int, default=15, help="EXPLAIN runs per statement.")
    parser.add_argument("--rounds", type=int, default=5, help="Rounds of --calls unfiltered requests, at the end.")
    parser.add_argument("--plans", type=Path, default=ROOT / "bench" / "out" / "dashboard-plans.txt")
    options = parser.parse_args()

    app = create_app({"RATELIMIT_ENABLED": False})
    client = app.test_client()
    login = client.post("/api/auth/login", json={"username": DEMO_USER, "password": DEMO_PASSWORD})
    assert login.status_code == 200, login.get_json()
    headers = {"Authorization": f"Bearer {login.get_json()['access_token']}"}
    with app.app_context():
        total = db.session.scalar(select(func.count()).select_from(Task))
    print(f"{total:,} tasks, load average {os.getloadavg()[0]:.2f} at the start\n")

    rows, plans = [], []
    for name, query in queries(app):
        recorded = []

        def record(_conn, _cursor, statement, parameters, *_args, into=recorded):
            if "task_counts" in statement or "FROM tasks" in statement:
                into.append((statement, parameters))

        with app.app_context():
            engine = db.engine
        event.listen(engine, "before_cursor_execute", record)
        response = client.get(f"/api/analytics/dashboard?{query}", headers=headers)
        event.remove(engine, "before_cursor_execute", record)
        assert response.status_code == 200, response.get_json()
        (statement, parameters), *others = recorded
        assert not others, f"{name}: {len(recorded)} statements"
        planning, execution, sql_total = sql_ms(app, statement, parameters, options.runs)
        plans.append(f"== {name}: ?{query}\n{plan_text(app, statement, parameters)}\n")

        times = sorted(timed(client, query, headers, options.calls))
        p90 = times[int(len(times) * 0.9) - 1]
        rows.append((name, query, planning, execution, sql_total, statistics.median(times), p90))

    print("| Query | SQL planning ms | SQL execution ms | SQL ms | in-process median ms | in-process p90 ms |")
    print("|---|--:|--:|--:|--:|--:|")
    for name, query, planning, execution, sql_total, median, p90 in rows:
        shown = f"`?{query}`" if query else "(none)"
        print(f"| {name}: {shown} | {planning:.2f} | {execution:.2f} | {sql_total:.2f} | {median:.2f} | {p90:.2f} |")
    # The machine is shared: the unfiltered request again, in rounds, with the load each round started under.
    print(f"\nUnfiltered, {options.rounds} rounds of {options.calls} requests (in-process ms):\n")
    for _ in range(options.rounds):
        load = os.getloadavg()[0]
        times = sorted(timed(client, "", headers, options.calls))
        print(f"- load {load:.2f}: min {times[0]:.2f}, median {statistics.median(times):.2f}")
    options.plans.parent.mkdir(parents=True, exist_ok=True)
    options.plans.write_text("\n".join(plans))
    print(f"\nPlans: {options.plans}")


if __name__ == "__main__":
    main()
