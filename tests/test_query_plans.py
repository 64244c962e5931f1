"""The hot paths' query plans at 200,000 tasks, on PostgreSQL: a change that makes one of them slower fails here.

For each hot endpoint, one request through the test client (with a real token) on a database of the module's own,
seeded once with 200,000 tasks, their history and 50 people, then analyzed as autovacuum would have by then. Every
statement the request sends is recorded with its parameters and explained (``EXPLAIN (FORMAT JSON)``, never
executed again), and the test asserts, from ``ENDPOINTS``:

1. how many statements the request sends (transaction control aside);
2. that no plan reads ``tasks`` or ``task_events`` by a sequential scan, or sorts what it read from them but for a
   page (see ``plan_problems``);
3. that the intended indexes are read.

Plans, not timings: no figure here depends on how busy the machine is, and `make bench` stays the source of those.
Its database is on the suite's PostgreSQL server (else the local one, as test_failure.py's); conftest.py's
``collect_ignore`` leaves it out of the SQLite run, so that `make test` runs it once."""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, time

import pytest
import sqlalchemy as sa
from conftest import APP_ENVIRONMENT, create_schema
from psycopg2.extensions import STATUS_READY
from werkzeug.security import generate_password_hash

from app import create_app
from helpers import FAST_HASH, PASSWORD, scratch_postgres_database, settings, token_for
from models import Task, TaskEvent, db

TASKS = 200_000
USERS = 50  # staff01 is an administrator, the caller of every request; staff50 is deactivated
HOT_TABLES = ("tasks", "task_events")
# The tables the writes keep for the counts and the dashboard; analyzed, like the hot ones, once, from every row.
KEPT_TABLES = ("task_counts", "entity_name_counts", "task_day_counts", "time_to_close_counts", "times_to_close")
TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE", "ROLLBACK")
# The most rows a sort over the hot tables may keep (LIMIT plus OFFSET): an export batch (1,000), a page of the list
# with the row that tells whether there is a next one (per_page + 1 <= 101), the facets' entity names (<= 1,000).
TOP_N = 1_000
# Task i (1 to TASKS) has id uuid.UUID(int=i); person n (1 to USERS) has id PERSON.format(n).
PERSON = "00000000-0000-4000-8000-{:012x}"
STATISTICS_TARGET = 1_500  # ANALYZE samples 300 x 1,500 = 450,000 rows: more than either table has
FRAGMENT = "kestr"  # in one entity stem of 50: about 2% of the tasks, as the partial match

SEED_USERS = """
INSERT INTO app_users (id, username, email, password_hash, full_name, is_active, created_at, is_admin,
                       email_verified_at)
SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, 'staff' || lpad(n::text, 2, '0'),
       'staff' || lpad(n::text, 2, '0') || '@example.com', :password_hash,
       (ARRAY['Ada', 'Ben', 'Cleo', 'Dev', 'Eva', 'Finn', 'Gia'])[1 + n % 7] || ' Staff ' || n, n <> :users,
       timestamptz '2021-01-01 00:00:00+00', n = 1, timestamptz '2021-01-01 00:00:00+00'
FROM generate_series(1, :users) AS n
"""
# Nearly four years of tasks, one every 10 minutes up to today's midnight (the dashboard's weeks, due dates and
# closings are counted back from now: they must hold what they hold in production). Older tasks are mostly closed;
# 2% deleted; 2.5% unassigned; due from 3 days before to 11 days after their creation.
SEED_TASKS = """
INSERT INTO tasks (id, date_created, entity_name, task_type, task_time, contact_person_id, note, status,
                   created_by_id, updated_at, version, closed_at, closed_by_id, deleted_at)
SELECT lpad(to_hex(i), 32, '0')::uuid, t,
       (ARRAY['Northwind', 'Harbor', 'Summit', 'Bluewater', 'Cedar', 'Granite', 'Evergreen', 'Pinnacle', 'Riverside',
              'Atlas', 'Beacon', 'Crescent', 'Keystone', 'Lighthouse', 'Meridian', 'Oakridge', 'Redwood', 'Silverline',
              'Sterling', 'Trident', 'Vanguard', 'Westbrook', 'Zenith', 'Alder', 'Birchwood', 'Copperfield',
              'Driftwood', 'Eastgate', 'Fairview', 'Goldcrest', 'Highland', 'Ironbridge', 'Juniper', 'Kingsley',
              'Lakeshore', 'Orchard', 'Parkside', 'Rosewood', 'Stonegate', 'Tidewater', 'Aurora', 'Canyon', 'Delta',
              'Falcon', 'Glacier', 'Horizon', 'Kestrel', 'Monarch', 'Olympus', 'Müller'])[1 + (i / 3) % 50]
       || ' ' || (ARRAY['Corporation', 'Holdings', 'LLC', 'Ltd', 'Trust', 'Group', 'Partners', 'Ventures', 'GmbH',
                        'Family Office'])[1 + (i / 7) % 10],
       (ARRAY['Call', 'Call', 'Call', 'Call', 'Call', 'Call', 'Call', 'Call', 'Email', 'Email', 'Email', 'Email',
              'Email', 'Meeting', 'Meeting', 'Meeting', 'Meeting', 'Follow-up', 'Follow-up', 'Site visit'])[1 + i % 20],
       t + (i % 15 - 3) * interval '1 day',
       CASE WHEN i % 40 <> 0 THEN ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i * 3 % 49), 12, '0'))::uuid END,
       CASE WHEN i % 5 < 2 THEN 'Left a voicemail, will try again tomorrow.' END,
       CASE WHEN closed THEN 'closed' ELSE 'open' END,
       ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i * 13 % 49), 12, '0'))::uuid,
       greatest(t, closed_at, deleted_at), 1 + closed::int + (deleted_at IS NOT NULL)::int, closed_at,
       CASE WHEN closed THEN ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i * 17 % 49), 12, '0'))::uuid END,
       deleted_at
FROM generate_series(1, :tasks) AS i,
     LATERAL (SELECT CAST(:today AS timestamptz) - (:tasks + 1 - i) * interval '10 minutes' AS t) AS created,
     LATERAL (SELECT i % 10 < CASE WHEN t < CAST(:today AS timestamptz) - interval '30 days' THEN 8 ELSE 3 END
             AS closed) AS state,
     LATERAL (SELECT CASE WHEN closed THEN least(t + (1 + i % 240) * interval '1 hour', CAST(:today AS timestamptz))
                     END AS closed_at,
                     CASE WHEN i % 50 = 7 THEN least(t + interval '1 day', CAST(:today AS timestamptz)) END
                     AS deleted_at) AS later
"""
# Each task's history as the API would have written it: created, then closed, then deleted, in time order.
SEED_EVENTS = """
INSERT INTO task_events (task_id, occurred_at, actor_id, action, field, old_value, new_value)
SELECT task_id, occurred_at, actor_id, action, field, old_value, new_value FROM (
    SELECT id AS task_id, date_created AS occurred_at, created_by_id AS actor_id, 'created' AS action,
           NULL AS field, NULL::json AS old_value,
           json_build_object('entity_name', entity_name, 'task_type', task_type, 'status', 'open') AS new_value
    FROM tasks
    UNION ALL
    SELECT id, closed_at, closed_by_id, 'status_changed', 'status', '"open"', '"closed"'
    FROM tasks WHERE closed_at IS NOT NULL
    UNION ALL
    SELECT id, deleted_at, created_by_id, 'deleted', NULL, NULL, NULL FROM tasks WHERE deleted_at IS NOT NULL
) AS history
ORDER BY occurred_at, task_id
"""


def person(n: int) -> str:
    return PERSON.format(n)


@dataclass(frozen=True)
class Endpoint:
    """One request, how many statements it sends, and the indexes its plans must read (each in one plan or more)."""

    statements: int
    method: str
    path: str  # formatted with the ``ids`` fixture
    indexes: tuple[str, ...] = ()
    body: dict | str | None = None  # a str names a body the ``ids`` fixture makes
    problem: str | None = None  # a plan the app gets wrong today: an expected failure (strict) until it is fixed


LOGIN = {"username": "staff02", "password": PASSWORD}
NEW_TASK = {"entity_name": "Kestrel Holdings", "task_type": "Call", "task_time": "2030-01-15T10:00:00Z",
            "contact_person_id": person(3)}  # fmt: skip
CHANGES = {"note": "Called back.", "task_type": "Meeting"}

# The one place to change when a change alters what a request sends on purpose (a round trip saved, say): a wrong
# count fails with the statements the request sent and their plans. Each count but health's and login's includes the
# token check (the caller and the token's revocation, in one statement). The list sends the token check and the page
# with its people joined in and its total (from task_counts, or from entity_name_counts for the entity name and the
# status, or a COUNT for other filters) in a scalar subquery.
# fmt: off
ENDPOINTS = {
    "health":                 Endpoint(1, "GET", "/api/health"),
    "login":                  Endpoint(2, "POST", "/api/auth/login", body=LOGIN),  # the locked user, the new session
    "users":                  Endpoint(2, "GET", "/api/users"),
    "list":                   Endpoint(2, "GET", "/api/tasks", ("ix_tasks_date_created_id",)),
    "list_status":            Endpoint(2, "GET", "/api/tasks?status=open", ("ix_tasks_status_date_created_id",)),
    "list_assignee":          Endpoint(2, "GET", f"/api/tasks?contact_person_id={person(7)}",
                                       ("ix_tasks_contact_person_id_date_created_id",)),
    "list_task_type":         Endpoint(2, "GET", "/api/tasks?task_type=meet", ("ix_tasks_date_created_id",)),
    # The partial match's total is summed from entity_name_counts (migration 0006): the page alone reads the tasks,
    # newest first along the default sort's index until it has its rows, instead of every match by the trigram index.
    # (The kept names are scanned here, under 1,000 rows; at a million tasks, 7,363, their trigram index is read.)
    "list_entity_fragment":   Endpoint(2, "GET", f"/api/tasks?entity_name={FRAGMENT}",
                                       ("ix_tasks_date_created_id",)),
    "list_entity_fragment_status": Endpoint(2, "GET", f"/api/tasks?entity_name={FRAGMENT}&status=closed",
                                            ("ix_tasks_date_created_id",)),  # most tasks are closed
    "sort_date_created_asc":  Endpoint(2, "GET", "/api/tasks?sort_order=asc", ("ix_tasks_date_created_id",)),
    "sort_task_time":         Endpoint(2, "GET", "/api/tasks?sort_by=task_time", ("ix_tasks_task_time_id",)),
    "sort_entity_name":       Endpoint(2, "GET", "/api/tasks?sort_by=entity_name&sort_order=asc",
                                       ("ix_tasks_entity_name_sort",)),
    "sort_task_type":         Endpoint(2, "GET", "/api/tasks?sort_by=task_type", ("ix_tasks_task_type_sort",)),
    "sort_status":            Endpoint(2, "GET", "/api/tasks?sort_by=status", ("ix_tasks_status_id",)),
    "sort_updated_at":        Endpoint(2, "GET", "/api/tasks?sort_by=updated_at", ("ix_tasks_updated_at_id",)),
    "cursor_page":            Endpoint(2, "GET", "/api/tasks?cursor={cursor}", ("ix_tasks_date_created_id",)),
    "deep_cursor_page":       Endpoint(2, "GET", "/api/tasks?cursor={deep_cursor}", ("ix_tasks_date_created_id",)),
    # docs/api.md: a deep offset page steps over the rows before it in the index's order, never sorting them.
    "deep_offset_page":       Endpoint(2, "GET", "/api/tasks?page=2500", ("ix_tasks_date_created_id",)),
    "one_task":               Endpoint(2, "GET", "/api/tasks/{open_task}", ("pk_tasks",)),
    # The token check, whether the task is live, the page of events, their total.
    "history":                Endpoint(4, "GET", "/api/tasks/{closed_task}/history", ("ix_task_events_task_id_id",)),
    # The token check, the assignee, the task, its event.
    "create":                 Endpoint(4, "POST", "/api/tasks", body=NEW_TASK),
    # The token check, the lock, the task with its people, its events (one INSERT), the UPDATE.
    "update":                 Endpoint(5, "PUT", "/api/tasks/{updated_task}", ("pk_tasks",), CHANGES),
    "status":                 Endpoint(5, "PATCH", "/api/tasks/{closing_task}/status", ("pk_tasks",),
                                       {"status": "closed"}),
    # The token check, the locks (one SELECT), the UPDATE, the events (one INSERT).
    "bulk_status":            Endpoint(4, "PATCH", "/api/tasks/bulk-status", ("pk_tasks",), "bulk"),
    # Kept figures (migration 0005), and the day's part of an index at each window's edge.
    "dashboard":              Endpoint(2, "GET", "/api/analytics/dashboard",
                                       ("ix_tasks_open_task_time", "ix_tasks_closed_at_date_created",
                                        "pk_task_day_counts", "pk_time_to_close_counts", "pk_times_to_close")),
    "dashboard_status":       Endpoint(2, "GET", "/api/analytics/dashboard?status=open",
                                       ("ix_tasks_open_task_time", "pk_task_day_counts")),
    # Types and assignees from task_counts, entity names from entity_name_counts: no task read.
    "facets":                 Endpoint(2, "GET", "/api/tasks/facets"),
    "facets_status":          Endpoint(2, "GET", "/api/tasks/facets?status=open"),
    "facets_entity_fragment": Endpoint(2, "GET", f"/api/tasks/facets?entity_name={FRAGMENT}",
                                       ("ix_tasks_entity_name_trgm",)),
    # The token check and the first batch (the others are read as the body streams, a statement each).
    "export_first_batch":     Endpoint(2, "GET", "/api/tasks/export.csv", ("ix_tasks_date_created_id",)),
}
# fmt: on


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A database of the module's own: the seed once per run, and the requests' commits real."""
    with scratch_postgres_database("finstack_plans") as url:
        engine = sa.create_engine(url)
        today = datetime.combine(datetime.now(UTC).date(), time.min, tzinfo=UTC)
        indexes = [*Task.__table__.indexes, *TaskEvent.__table__.indexes]
        with engine.begin() as connection:
            create_schema(connection)
            # The indexes are built after the rows, as a restore does: a third faster than keeping them up row by row.
            connection.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")
            for index in indexes:
                index.drop(connection)
            password_hash = generate_password_hash(PASSWORD, method=FAST_HASH)
            connection.execute(sa.text(SEED_USERS), {"users": USERS, "password_hash": password_hash})
            connection.execute(sa.text(SEED_TASKS), {"tasks": TASKS, "today": today})
            connection.execute(sa.text(SEED_EVENTS))
            for index in indexes:
                index.create(connection)
            for table in (*HOT_TABLES, *KEPT_TABLES):  # statistics taken once, below: autovacuum's samples would vary
                connection.exec_driver_sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            # What autovacuum would have done by now: statistics, and the visibility map for index-only scans. From
            # every row rather than a random sample of them (300 per unit of the target), so that each run plans alike.
            connection.exec_driver_sql(f"SET default_statistics_target = {STATISTICS_TARGET}")
            connection.exec_driver_sql(f"VACUUM (ANALYZE) {', '.join((*HOT_TABLES, *KEPT_TABLES, 'app_users'))}")
        engine.dispose()
        yield url


@pytest.fixture(scope="module")
def app(database, tmp_path_factory):
    """The app on the module's database, built once, from no environment (as conftest's ``clean_environment``)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in APP_ENVIRONMENT:
            monkeypatch.delenv(name, raising=False)
        app = create_app(settings(database, tmp_path_factory.mktemp("plans")))
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture(scope="module")
def headers(app) -> dict:
    """A token of staff01, an administrator: every write below is one it may make."""
    return {"Authorization": f"Bearer {token_for(app, person(1))}"}


@pytest.fixture(scope="module")
def ids(app, headers) -> dict:
    """The values the ``ENDPOINTS`` paths and bodies name: tasks picked by a fixed rule, cursors as the list gives
    them. The writes change a task each, and the bulk update 1,000 others."""
    client = app.test_client()

    def next_cursor(query: str) -> str:
        response = client.get(f"/api/tasks?{query}", headers=headers)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["pagination"]["next_cursor"]

    with app.app_context():
        live_open = db.session.scalars(
            sa.text("SELECT id::text FROM tasks WHERE status = 'open' AND deleted_at IS NULL ORDER BY id LIMIT 1003")
        ).all()
        closed = db.session.scalar(sa.text("SELECT id::text FROM tasks WHERE status = 'closed' ORDER BY id LIMIT 1"))
    return {
        "open_task": live_open[0],
        "updated_task": live_open[1],
        "closing_task": live_open[2],
        "closed_task": closed,
        "bulk": {"task_ids": live_open[3:], "status": "closed"},
        "cursor": next_cursor(""),
        "deep_cursor": next_cursor("page=2500"),
    }


@contextmanager
def recorded(app) -> Iterator[list[tuple[str, object]]]:
    """The statements (and their parameters) the app sends meanwhile, transaction control aside."""
    statements = []

    def record(_conn, _cursor, statement, parameters, _context, executemany):
        if not statement.lstrip().upper().startswith(TRANSACTION_CONTROL):
            # insertmanyvalues sends many rows in one statement with one set of parameters, executemany a list of sets
            many = executemany and isinstance(parameters, list | tuple)
            statements.append((statement, parameters[0] if many else parameters))

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def explained(app, statement: str, parameters) -> tuple[str, dict]:
    """The statement as sent (parameters in) and its plan, in a transaction rolled back. EXPLAIN without ANALYZE
    plans a write but never runs it."""
    with app.app_context():
        connection = db.engine.raw_connection()
    try:
        with connection.cursor() as cursor:
            sent = cursor.mogrify(statement, parameters).decode()
            cursor.execute("EXPLAIN (FORMAT JSON) " + sent)
            plan = cursor.fetchone()[0][0]["Plan"]
        connection.rollback()
    finally:
        connection.close()
    return sent, plan


def nodes(plan: dict, ancestors: tuple = ()) -> Iterator[tuple[dict, tuple]]:
    """Every node of a plan with its ancestors, nearest last. Init plans, subplans and CTEs are children in "Plans"
    too (their "Parent Relationship" says which)."""
    yield plan, ancestors
    for child in plan.get("Plans", []):
        yield from nodes(child, (*ancestors, plan))


def reads_hot_table(plan: dict) -> bool:
    return any(node.get("Relation Name") in HOT_TABLES for node, _ in nodes(plan))


def describe(node: dict) -> str:
    on = f" on {node['Relation Name']}" if "Relation Name" in node else ""
    using = f" using {node['Index Name']}" if "Index Name" in node else ""
    parallel = "Parallel " if node.get("Parallel Aware") else ""
    return f"{parallel}{node['Node Type']}{on}{using} (about {node['Plan Rows']:,} rows)"


def kept_rows(sent: str) -> int:
    """The most rows a LIMIT of the statement keeps, its OFFSET included (0 without a LIMIT)."""
    limits = re.findall(r"\bLIMIT (\d+)(?: OFFSET (\d+))?", sent)
    return max((int(limit) + int(offset or 0) for limit, offset in limits), default=0)


def plan_problems(sent: str, plan: dict) -> list[str]:
    """What in the plan reads ``tasks`` or ``task_events`` the slow way.

    - A sequential scan of either: it reads every row, and its cost grows with the table however small the answer.
    - A Sort of rows read from either, unless it is a top-N sort under a Limit of at most ``TOP_N`` rows (OFFSET
      included): that one keeps only the page in memory while the rows go by, which a page of a substring match
      needs (the rows come from the trigram index, and the exact total reads them anyway). Any other sort sorts
      everything it is given (all of the filtered rows, or every row before a deep OFFSET), spills to disk as the
      table grows, and is what a missing or unusable index looks like. EXPLAIN without ANALYZE does not say which
      sort method runs, so the Limit is read from the statement itself (a Gather Merge between the two is the same
      top-N sort, split between workers). An Incremental Sort, which finishes the order of rows an index already
      gives sorted by their leading keys, is allowed.

    Aggregates that order their input themselves (the dashboard's median, percentile_disc ... WITHIN GROUP) are no
    Sort node: they are bounded by the index range that feeds them, which ``indexes`` names."""
    problems = []
    for node, ancestors in nodes(plan):
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in HOT_TABLES:
            problems.append(describe(node))
        elif node["Node Type"] == "Sort" and reads_hot_table(node):
            above = [ancestor["Node Type"] for ancestor in ancestors if ancestor["Node Type"] != "Gather Merge"]
            if not (above and above[-1] == "Limit" and 0 < kept_rows(sent) <= TOP_N):
                keys = ", ".join(node.get("Sort Key", []))
                parent = above[-1] if above else "nothing"
                problems.append(f"{describe(node)} by {keys}, under {parent}, keeping {kept_rows(sent) or 'all'} rows")
    return problems


def indexes_read(plan: dict) -> set[str]:
    return {node["Index Name"] for node, _ in nodes(plan) if "Index Name" in node}


def shortened(sent: str) -> str:
    """A statement for a failure message: runs of plain columns left out, at most 1,500 characters."""
    return re.sub(r"(?:\b\w+\.\w+(?: AS \w+)?, ){4,}", "..., ", sent)[:1500]


def plan_text(plan: dict) -> str:
    return "\n".join("  " * len(ancestors) + describe(node) for node, ancestors in nodes(plan))


def endpoint_param(name: str, endpoint: Endpoint):
    marks = [pytest.mark.xfail(strict=True, reason=endpoint.problem)] if endpoint.problem else []
    return pytest.param(name, endpoint, id=name, marks=marks)


@pytest.mark.parametrize(("name", "endpoint"), [endpoint_param(name, endpoint) for name, endpoint in ENDPOINTS.items()])
def test_hot_endpoint_sends_its_statements_with_index_plans(app, headers, ids, name, endpoint):
    body = ids[endpoint.body] if isinstance(endpoint.body, str) else endpoint.body
    client = app.test_client()

    with recorded(app) as statements:
        # The export's first batch is read before its answer starts; reading the body would fetch the rest.
        response = client.open(endpoint.path.format(**ids), method=endpoint.method, headers=headers, json=body)

    assert response.status_code in (200, 201), response.get_data()[:500]
    response.close()
    plans = [explained(app, statement, parameters) for statement, parameters in statements]
    listing = "\n".join(f"{n}. {shortened(sent)}\n{plan_text(plan)}" for n, (sent, plan) in enumerate(plans, 1))
    assert len(statements) == endpoint.statements, (
        f"{name} sent {len(statements)} statements, ENDPOINTS says {endpoint.statements}:\n{listing}"
    )
    problems = [f"{problem} in:\n{shortened(sent)}" for sent, plan in plans for problem in plan_problems(sent, plan)]
    assert not problems, f"{name}: " + "\n".join(problems) + f"\n\nEvery statement:\n{listing}"
    read = set().union(*(indexes_read(plan) for _sent, plan in plans))
    missing = [index for index in endpoint.indexes if index not in read]
    assert not missing, f"{name} does not read {missing}:\n{listing}"


READS = [name for name, endpoint in ENDPOINTS.items() if endpoint.method == "GET" and endpoint.statements > 1]


@pytest.mark.parametrize("name", READS)
def test_a_read_sends_no_begin_and_no_rollback(app, headers, ids, name):
    """GET requests run in autocommit (config.reads_without_transactions). psycopg2 sends BEGIN just before a
    transaction's first statement, so a second statement finding the connection outside a transaction means none
    was begun, and none is ended. A write still gets its transaction."""
    in_transaction = []

    def note(connection, *_args):
        in_transaction.append(connection.connection.dbapi_connection.status != STATUS_READY)

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        client = app.test_client()
        read = client.get(ENDPOINTS[name].path.format(**ids), headers=headers)
        assert read.status_code == 200
        read.close()
        reads, in_transaction[:] = list(in_transaction), []
        write = client.patch(f"/api/tasks/{ids['closing_task']}/status", json={"status": "open"}, headers=headers)
        assert write.status_code == 200
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)

    assert reads and not any(reads), reads
    assert in_transaction[1:] and all(in_transaction[1:]), in_transaction  # BEGIN goes with the first
