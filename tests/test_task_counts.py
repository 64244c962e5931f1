"""The tables triggers keep: task_counts (per status, type and assignee), entity_name_counts (per entity name and
status) and the dashboard's task_day_counts, time_to_close_counts and times_to_close, each checked against a full
recount after every kind of write, through the API, in plain SQL, through migrations and under concurrent traffic."""

import random
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from app import create_app
from helpers import GUNICORN, POSTGRES_URL, call, settings
from models import (
    Task,
    User,
    db,
    entity_name_counts,
    simple_lower,
    task_counts,
    task_day_counts,
    time_to_close_bucket,
    time_to_close_counts,
    times_to_close,
)
from routes.tasks import task_filters

MICROSECOND = timedelta(microseconds=1)
KEPT_TABLES = (task_counts, entity_name_counts, task_day_counts, time_to_close_counts, times_to_close)


def kept_and_recounted(connection) -> tuple[dict, dict]:
    """Every kept table's rows (zero rows left out) and a recount of the live tasks themselves, keyed alike: by the
    table's name and its key (an assignee as text)."""
    kept = {}
    for table in KEPT_TABLES:
        for *key, n in connection.execute(sa.select(table)):
            if n:
                kept[(table.name, *(str(value) if isinstance(value, uuid.UUID) else value for value in key))] = n
    recounted = Counter()
    live = connection.execute(
        sa.select(
            Task.status,
            Task.task_type,
            Task.contact_person_id,
            Task.entity_name,
            Task.date_created,
            Task.task_time,
            Task.closed_at,
        ).where(Task.deleted_at.is_(None))
    )
    for status, task_type, person, entity_name, created, due, closed_at in live:
        recounted["task_counts", status, task_type, str(person) if person else None] += 1
        recounted["entity_name_counts", entity_name, status] += 1
        recounted["task_day_counts", "created", created.date(), status] += 1
        if status == "open":
            recounted["task_day_counts", "due", due.date(), status] += 1
        if closed_at is not None:
            took = (closed_at - created) // MICROSECOND
            recounted["task_day_counts", "closed", closed_at.date(), status] += 1
            recounted["time_to_close_counts", closed_at.date(), time_to_close_bucket(took)] += 1
            recounted["times_to_close", time_to_close_bucket(took), closed_at.date(), took] += 1
    return kept, dict(recounted)


def assert_counts_exact(app) -> dict:
    """Every kept table equals its recount; returns the recount of task_counts, keyed (status, type, assignee)."""
    with app.app_context():
        kept, recounted = kept_and_recounted(db.session)
    assert kept == recounted
    return {key[1:]: n for key, n in recounted.items() if key[0] == "task_counts"}


def test_every_kind_of_api_write_keeps_the_counts_exact(
    app, client, auth_headers, admin_headers, user, other_user, make_task
):
    alice, bob = user["id"], other_user["id"]
    created = []
    for task_type, person in [("Call", alice), ("Meeting", bob), ("Call", bob), ("Email", alice)]:
        body = {"entity_name": "ABC Corporation", "task_type": task_type, "task_time": "2025-01-01T09:00:00Z"}
        response = client.post("/api/tasks", json=body | {"contact_person_id": person}, headers=auth_headers)
        assert response.status_code == 201
        created.append(response.get_json()["task"]["id"])
    created += [make_task(status="closed", task_type="Review")["id"] for _ in range(3)]
    assert sum(assert_counts_exact(app).values()) == 7

    steps = [
        ("PUT", f"/api/tasks/{created[0]}", {"task_type": "Meeting"}),
        ("PUT", f"/api/tasks/{created[1]}", {"contact_person_id": alice}),
        ("PUT", f"/api/tasks/{created[1]}", {"entity_name": "Müller & Söhne GmbH"}),
        ("PUT", f"/api/tasks/{created[5]}", {"entity_name": "abc corporation", "status": "open"}),
        ("PUT", f"/api/tasks/{created[2]}", {"note": "only the note"}),
        ("PUT", f"/api/tasks/{created[2]}", {"task_time": "2026-01-02T03:04:05.678901Z"}),
        ("PUT", f"/api/tasks/{created[3]}", {"status": "closed", "task_type": "Follow-up", "contact_person_id": bob}),
        ("PATCH", f"/api/tasks/{created[4]}/status", {"status": "open"}),
        ("PATCH", "/api/tasks/bulk-status", {"task_ids": created, "status": "closed"}),  # some were closed already
        ("PATCH", "/api/tasks/bulk-status", {"task_ids": created[:5], "status": "open"}),
        ("DELETE", f"/api/tasks/{created[5]}", None),
        ("DELETE", f"/api/tasks/{created[6]}", None),
        ("POST", f"/api/tasks/{created[6]}/restore", None),
    ]
    for method, path, body in steps:
        response = client.open(path, method=method, json=body, headers=admin_headers)
        assert response.status_code == 200, (method, path, response.get_json())
        assert_counts_exact(app)
    purge = app.test_cli_runner().invoke(args=["purge-deleted", "--older-than", "0h"])  # the deleted task, for good
    assert purge.exit_code == 0, purge.output
    assert "Purged 1 task(s)" in purge.output
    assert_counts_exact(app)

    with app.app_context():  # bob's tasks become unassigned by the foreign key, and move with it
        db.session.delete(db.session.get(User, uuid.UUID(bob)))
        db.session.commit()
    counts = assert_counts_exact(app)
    assert counts[("open", "Follow-up", None)] == 1
    assert sum(counts.values()) == 6


def test_plain_sql_writes_of_many_rows_keep_the_counts_exact(app, user):
    people = [uuid.UUID(user["id"]), None]
    rows = [
        {
            "id": uuid.uuid4(),
            "entity_name": f"Entity {n}",
            "task_type": ("Call", "Meeting", "Email")[n % 3],
            "task_time": datetime(2025, 1, 1, tzinfo=UTC),
            "date_created": datetime(2025, 1, 1, tzinfo=UTC),
            "updated_at": datetime(2025, 1, 1, tzinfo=UTC),
            "contact_person_id": people[n % 2],
            "status": ("open", "closed")[n % 5 == 0],
            "closed_at": datetime(2025, 1, 2, tzinfo=UTC) if n % 5 == 0 else None,
        }
        for n in range(200)
    ]
    now = datetime.now(UTC)
    with app.app_context():
        db.session.execute(sa.insert(Task), rows)
        db.session.commit()
        db.session.execute(
            sa.update(Task)
            .where(Task.task_type == "Call")
            .values(status="closed", closed_at=sa.func.coalesce(Task.closed_at, now))
        )
        db.session.execute(sa.update(Task).where(Task.task_type == "Email").values(contact_person_id=people[0]))
        # many names into one, and one name split between two, in one statement each
        db.session.execute(sa.update(Task).where(Task.entity_name.like("Entity 19%")).values(entity_name="Entity 19"))
        db.session.execute(
            sa.update(Task)
            .where(Task.entity_name.like("Entity 2%"))
            .values(entity_name=sa.case((Task.status == "open", "Entity 2 open"), else_="Entity 2 closed"))
        )
        db.session.execute(sa.update(Task).values(note="touched"))  # no counted column changes
        db.session.execute(sa.delete(Task).where(Task.task_type == "Meeting", Task.status == "open"))
        db.session.commit()
    counts = assert_counts_exact(app)
    assert sum(counts.values()) == 200 - sum(1 for n in range(200) if n % 3 == 1 and n % 5 != 0)

    with app.app_context():  # a soft delete leaves the counts, a restore comes back; deleted rows count for nothing
        emails = Task.task_type == "Email"
        db.session.execute(sa.update(Task).where(emails).values(deleted_at=now))
        db.session.commit()
        assert not any(task_type == "Email" for _, task_type, _ in assert_counts_exact(app))
        db.session.execute(sa.update(Task).where(emails).values(status="closed", closed_at=now))
        db.session.execute(sa.delete(Task).where(emails, Task.entity_name.like("Entity 1%")))
        db.session.execute(sa.update(Task).where(emails).values(deleted_at=None))
        db.session.commit()
        restored = db.session.scalar(sa.select(sa.func.count()).where(emails))
    assert restored > 0
    assert assert_counts_exact(app)[("closed", "Email", user["id"])] == restored

    if POSTGRES_URL:
        with app.app_context():
            db.session.execute(sa.text("TRUNCATE tasks"))
            db.session.commit()
        assert assert_counts_exact(app) == {}


def test_plain_sql_writes_of_the_times_keep_the_dashboard_tables_exact(app, user):
    """Times a microsecond apart, at the extremes, spans in every range of buckets (negative ones too, which only
    plain SQL can write), moved by multi-row UPDATEs of each time, of the status and of the deletion, then deleted."""
    shuffle = random.Random(3)
    base = datetime(2026, 3, 1, 12, tzinfo=UTC)
    rows = []
    for n in range(300):
        created = base - timedelta(days=shuffle.uniform(0, 60), microseconds=shuffle.randrange(10**6))
        took = shuffle.choice(
            [
                timedelta(0),
                MICROSECOND * shuffle.randrange(1, 100),
                MICROSECOND * shuffle.randrange(10**12),
                timedelta(days=shuffle.uniform(0, 90)),
                -timedelta(hours=shuffle.uniform(0, 5)),
            ]
        )
        closed = n % 3 != 0
        rows.append(
            {
                "id": uuid.uuid4(),
                "date_created": created,
                "task_time": created + timedelta(days=shuffle.uniform(-3, 30)),
                "status": "closed" if closed else "open",
                "closed_at": created + took if closed else None,
                "deleted_at": base if n % 17 == 0 else None,
            }
        )
    first, last = datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    rows += [
        {"id": uuid.uuid4(), "date_created": first, "task_time": last, "status": "closed", "closed_at": last},
        {"id": uuid.uuid4(), "date_created": last, "task_time": first, "status": "closed", "closed_at": first},
        {"id": uuid.uuid4(), "date_created": first, "task_time": first, "status": "open", "closed_at": None},
        {"id": uuid.uuid4(), "date_created": last, "task_time": last, "status": "open", "closed_at": None},
    ]
    for row in rows:
        row |= {"entity_name": "ABC Corporation", "task_type": "Call", "updated_at": base}
        row.setdefault("deleted_at", None)
    ids = [row["id"] for row in rows]

    def moved(column, by: dict):
        """``column`` set, in one statement, to by[id] for each id given (their rows only)."""
        return sa.update(Task).where(Task.id.in_(list(by))).values({column: sa.case(by, value=Task.id)})

    def some(share: float) -> list[uuid.UUID]:
        return shuffle.sample(ids, int(len(ids) * share))

    by_id = {row["id"]: row for row in rows}
    closed_ids = [row["id"] for row in rows if row["closed_at"] is not None]
    steps = [
        sa.insert(Task).values(rows),
        moved(Task.task_time, {i: by_id[i]["task_time"] + timedelta(hours=20) for i in some(0.3) if i not in ids[-4:]}),
        moved(Task.date_created, {i: by_id[i]["date_created"] - MICROSECOND for i in some(0.3) if i not in ids[-4:]}),
        moved(Task.closed_at, {i: by_id[i]["closed_at"] + MICROSECOND for i in closed_ids[:150]}),
        sa.update(Task).where(Task.id.in_(closed_ids[100:200])).values(status="open", closed_at=None),
        sa.update(Task)
        .where(Task.id.in_(closed_ids[150:250]), Task.status == "open")
        .values(status="closed", closed_at=base + timedelta(minutes=5)),
        sa.update(Task).where(Task.id.in_(some(0.2))).values(deleted_at=base),
        sa.update(Task).where(Task.id.in_(some(0.3))).values(deleted_at=None),
        sa.update(Task).where(Task.id.in_(some(0.2))).values(note="no time changes"),
        sa.delete(Task).where(Task.id.in_(some(0.2))),
    ]
    for step in steps:
        with app.app_context():
            db.session.execute(step)
            db.session.commit()
        assert_counts_exact(app)
    with app.app_context():
        kept, _ = kept_and_recounted(db.session)
    assert {key[0] for key in kept} == {table.name for table in KEPT_TABLES}
    assert any(key[0] == "times_to_close" and key[-1] < 0 for key in kept)  # a negative time to close

    with app.app_context():
        db.session.execute(sa.text("TRUNCATE tasks" if POSTGRES_URL else "DELETE FROM tasks"))
        db.session.commit()
        kept, recounted = kept_and_recounted(db.session)
    assert kept == recounted == {}


def test_list_totals_and_the_dashboard_agree_with_a_recount(
    app, client, auth_headers, user, other_user, make_task, sql_statements
):
    shuffle = random.Random(5)
    for _ in range(60):
        make_task(
            status=shuffle.choice(["open", "closed"]),
            task_type=shuffle.choice(["Call", "Meeting", "Follow-up", "KYC check"]),
            entity_name=shuffle.choice(["ABC Corporation", "Müller & Söhne GmbH", "Northwind Trust"]),
            contact_person_id=shuffle.choice([uuid.UUID(user["id"]), uuid.UUID(other_user["id"]), None]),
        )
    with app.app_context():
        tasks = db.session.execute(sa.select(Task.status, Task.task_type, Task.entity_name, Task.contact_person_id))
        tasks = [row._asdict() for row in tasks]

    for query, expected, kept in [
        ("", len(tasks), "task_counts"),
        ("?status=open", sum(t["status"] == "open" for t in tasks), "task_counts"),
        (
            f"?contact_person_id={user['id']}",
            sum(str(t["contact_person_id"]) == user["id"] for t in tasks),
            "task_counts",
        ),
        ("?task_type=CALL", sum("call" in t["task_type"].lower() for t in tasks), "task_counts"),
        (
            "?status=closed&task_type=k",
            sum(t["status"] == "closed" and "k" in t["task_type"].lower() for t in tasks),
            "task_counts",
        ),
        ("?entity_name=müller", sum("müller" in t["entity_name"].lower() for t in tasks), "entity_name_counts"),
        (
            "?entity_name=CORP&status=open",
            sum(t["status"] == "open" and "corp" in t["entity_name"].lower() for t in tasks),
            "entity_name_counts",
        ),
        (
            "?entity_name=trust&task_type=call",
            sum("trust" in t["entity_name"].lower() and "call" in t["task_type"].lower() for t in tasks),
            None,  # a COUNT over the tasks
        ),
    ]:
        with sql_statements() as statements:
            response = client.get(f"/api/tasks{query}", headers=auth_headers)
        assert response.get_json()["pagination"]["total"] == expected, query
        [page] = [statement for statement in statements if "FROM tasks" in statement]
        for table in ("task_counts", "entity_name_counts"):
            assert (f"FROM {table}" in page) == (table == kept), query
        assert ("count(*)" in page) == (kept is None), query

    dashboard = client.get("/api/analytics/dashboard", headers=auth_headers).get_json()
    by_status = Counter(t["status"] for t in tasks)
    assert dashboard["summary"] == {
        "total_tasks": len(tasks),
        "open_tasks": by_status["open"],
        "closed_tasks": by_status["closed"],
    }
    assert {row["type"]: row["count"] for row in dashboard["task_types"]} == Counter(t["task_type"] for t in tasks)
    by_person = Counter(str(t["contact_person_id"]) if t["contact_person_id"] else None for t in tasks)
    assert {row["user_id"]: row["count"] for row in dashboard["user_tasks"]} == by_person


# Names the partial filter must match as the tasks' own COUNT does: wildcards and the escape character taken literally,
# mixed case, and letters beyond ASCII (whose case each database folds its own way, the same for kept rows and tasks).
AWKWARD_NAMES = [
    "ABC Corporation", "abc corp", "100% Capital", "1000 Capital", "Snake_Case Ltd", "SnakeXCase Ltd", "A/B Partners",
    "AB Partners", "MÜLLER GmbH", "Müller & Söhne", "Muller Inc", "ΣΑΣΑ Holdings", "σασα ltd", "İSTANBUL Ltd",  # noqa: RUF001
    "istanbul llc", "Straße AG", "STRASSE AG", "ǅemal d.o.o.", "Ǆemal Trust", "Gone Corp",
]  # fmt: skip
FRAGMENTS = [
    "corp", "CORP", "AbC", "100%", "%", "_", "e_c", "a/b", "/", "müller", "MÜLLER", "ü", "Ü", "σασ", "ΣΑΣ", "istanbul",  # noqa: RUF001
    "İ", "i", "straße", "SS", "ǆ", "Ǆ", "ǅ", "gone", "nothing like it",
]  # fmt: skip


def test_partial_entity_name_totals_and_facets_agree_with_a_count(app, client, auth_headers, make_task, sql_statements):
    shuffle = random.Random(14)
    for name in AWKWARD_NAMES:
        for _ in range(shuffle.randrange(1, 5)):
            make_task(entity_name=name, status=shuffle.choice(["open", "closed"]))
        make_task(entity_name=name, deleted_at=datetime.now(UTC))  # never counted
    with app.app_context():  # the only tasks of a name deleted: its counters stay, at 0, and are ignored
        db.session.execute(sa.update(Task).where(Task.entity_name == "Gone Corp").values(deleted_at=datetime.now(UTC)))
        db.session.commit()
        live = db.session.execute(sa.select(Task.entity_name, Task.status).where(Task.deleted_at.is_(None))).all()
        assert db.session.scalar(sa.select(sa.func.count()).where(entity_name_counts.c.n == 0)) > 0
    assert_counts_exact(app)

    for fragment, status in [(fragment, status) for fragment in FRAGMENTS for status in (None, "open", "closed")]:
        args = {"entity_name": fragment} | ({"status": status} if status else {})
        with app.app_context():  # the tasks' own COUNT, with the list's conditions, on this database
            counted = db.session.scalar(sa.select(sa.func.count()).select_from(Task).where(*task_filters(args)))
        with sql_statements() as statements:
            response = client.get("/api/tasks?" + urlencode(args), headers=auth_headers)
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["pagination"]["total"] == counted, args
        [page] = [statement for statement in statements if "FROM tasks" in statement]
        assert "FROM entity_name_counts" in page and "count(*)" not in page
        # Both databases fold case a character at a time, as models.simple_lower does: so does this recount.
        expected = sum(simple_lower(fragment) in simple_lower(name) and status in (None, task) for name, task in live)
        assert counted == expected, args

    for status in (None, "open", "closed"):
        chosen = Counter(name for name, task in live if status in (None, task))
        ranking = sorted(chosen.items(), key=lambda item: (-item[1], item[0]))
        with sql_statements() as statements:
            response = client.get("/api/tasks/facets?limit=5" + (f"&status={status}" if status else ""),
                                  headers=auth_headers)  # fmt: skip
        body = response.get_json()
        assert body["entity_names"] == [{"value": name, "count": n} for name, n in ranking[:5]], status
        assert body["entity_names_total"] == len(chosen), status
        [statement] = [statement for statement in statements if "task" in statement]
        assert "FROM entity_name_counts" in statement and "FROM tasks" not in statement


def trigger_definitions(connection) -> list[str]:
    if connection.get_bind().dialect.name == "sqlite":
        query = "SELECT sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"
        return connection.execute(sa.text(query)).scalars().all()
    query = (
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger "
        "WHERE tgrelid IN ('tasks'::regclass, 'task_events'::regclass) AND NOT tgisinternal "
        "UNION ALL SELECT prosrc FROM pg_proc "
        "WHERE proname IN ('task_counts_apply', 'entity_name_counts_apply', 'task_figures_apply', "
        "'task_events_append_only') "
        "ORDER BY 1"
    )
    return connection.execute(sa.text(query)).scalars().all()


def test_migrations_create_the_triggers_the_models_create(app, fresh_database_url, tmp_path):
    migrated = create_app(settings(fresh_database_url, tmp_path / "migrated"))
    assert migrated.test_cli_runner().invoke(args=["db", "upgrade"]).exit_code == 0

    with migrated.app_context():
        from_migrations = trigger_definitions(db.session)
        db.engine.dispose()
    with app.app_context():
        from_models = trigger_definitions(db.session)

    # The kept tables' triggers (and functions) on tasks, and the append-only ones on task_events.
    assert len(from_models) == (17 if POSTGRES_URL else 11)
    assert from_migrations == from_models


def test_upgrading_counts_the_tasks_already_there(fresh_database_url, tmp_path):
    app = create_app(settings(fresh_database_url, tmp_path))
    runner = app.test_cli_runner()
    assert runner.invoke(args=["db", "upgrade", "0002"]).exit_code == 0
    engine = sa.create_engine(fresh_database_url)
    with engine.begin() as connection:
        for n in range(30):
            connection.execute(
                sa.text(
                    "INSERT INTO tasks (id, date_created, entity_name, task_type, task_time, status, updated_at) "
                    "VALUES (:id, '2025-01-01', 'ABC', :task_type, '2025-01-01', :status, '2025-01-01')"
                ),
                {
                    "id": uuid.uuid4().hex if engine.dialect.name == "sqlite" else str(uuid.uuid4()),
                    "task_type": ("Call", "Meeting")[n % 2],
                    "status": ("open", "closed")[n % 3 == 0],
                },
            )

    assert runner.invoke(args=["db", "upgrade"]).exit_code == 0

    with engine.connect() as connection:
        kept, recounted = kept_and_recounted(connection)
    engine.dispose()
    assert kept == recounted
    assert sum(n for key, n in kept.items() if key[0] == "task_counts") == 30


def test_upgrading_to_the_kept_dashboard_tables_fills_them_and_downgrading_drops_them(fresh_database_url, tmp_path):
    app = create_app(settings(fresh_database_url, tmp_path))
    runner = app.test_cli_runner()
    assert runner.invoke(args=["db", "upgrade", "0004"]).exit_code == 0
    base, shuffle = datetime(2026, 5, 4, 9, 30, tzinfo=UTC), random.Random(9)
    rows = []
    for n in range(120):
        created = base - timedelta(days=shuffle.uniform(0, 50), microseconds=shuffle.randrange(10**6))
        closed_at = created + MICROSECOND * shuffle.randrange(10**11) if n % 2 else None
        rows.append(
            {
                "id": uuid.uuid4(),
                "entity_name": "ABC Corporation",
                "task_type": "Call",
                "date_created": created,
                "task_time": created + timedelta(days=shuffle.uniform(-2, 20)),
                "updated_at": created,
                "status": "closed" if closed_at else "open",
                "closed_at": closed_at,
                "deleted_at": base if n % 7 == 0 else None,
            }
        )
    engine = sa.create_engine(fresh_database_url)
    with engine.begin() as connection:
        connection.execute(sa.insert(Task), rows)

    def kept_tables() -> set[str]:
        with engine.connect() as connection:
            return set(sa.inspect(connection).get_table_names()) & {table.name for table in KEPT_TABLES}

    assert runner.invoke(args=["db", "upgrade"]).exit_code == 0
    with engine.connect() as connection:
        kept, recounted = kept_and_recounted(connection)
    assert kept == recounted
    assert sum(n for key, n in kept.items() if key[0] == "time_to_close_counts") == sum(
        1 for row in rows if row["closed_at"] and not row["deleted_at"]
    )

    assert runner.invoke(args=["db", "downgrade", "0004"]).exit_code == 0
    assert kept_tables() == {"task_counts"}
    with engine.begin() as connection:  # no trigger left behind to write to the dropped tables
        connection.execute(sa.update(Task).values(status="open", closed_at=None))
    assert runner.invoke(args=["db", "upgrade"]).exit_code == 0
    with engine.connect() as connection:
        kept, recounted = kept_and_recounted(connection)
    engine.dispose()
    assert kept == recounted
    assert not any(key[0] == "times_to_close" for key in kept)


def test_upgrading_to_entity_name_counts_fills_it_and_downgrading_drops_it(fresh_database_url, tmp_path):
    app = create_app(settings(fresh_database_url, tmp_path))
    runner = app.test_cli_runner()
    assert runner.invoke(args=["db", "upgrade", "0005"]).exit_code == 0
    shuffle, now = random.Random(6), datetime(2026, 5, 4, 9, 30, tzinfo=UTC)
    rows = [
        {
            "id": uuid.uuid4(),
            "entity_name": shuffle.choice(AWKWARD_NAMES),
            "task_type": "Call",
            "date_created": now,
            "task_time": now,
            "updated_at": now,
            "status": "closed" if n % 3 == 0 else "open",
            "closed_at": now if n % 3 == 0 else None,
            "deleted_at": now if n % 7 == 0 else None,
        }
        for n in range(150)
    ]
    engine = sa.create_engine(fresh_database_url)
    with engine.begin() as connection:
        connection.execute(sa.insert(Task), rows)

    def tables() -> set[str]:
        with engine.connect() as connection:
            return set(sa.inspect(connection).get_table_names())

    assert runner.invoke(args=["db", "upgrade"]).exit_code == 0
    with engine.connect() as connection:
        kept, recounted = kept_and_recounted(connection)
    assert kept == recounted
    assert sum(n for key, n in kept.items() if key[0] == "entity_name_counts") == sum(
        1 for row in rows if not row["deleted_at"]
    )

    assert runner.invoke(args=["db", "downgrade", "0005"]).exit_code == 0
    assert "entity_name_counts" not in tables()
    assert {table.name for table in KEPT_TABLES} - tables() == {"entity_name_counts"}
    with engine.begin() as connection:  # no trigger left behind to write to the dropped table
        connection.execute(sa.update(Task).values(entity_name="Renamed", deleted_at=None))
        connection.execute(sa.delete(Task).where(Task.status == "closed"))
    assert runner.invoke(args=["db", "upgrade"]).exit_code == 0
    with engine.connect() as connection:
        kept, recounted = kept_and_recounted(connection)
    engine.dispose()
    assert kept == recounted
    assert {key[1:] for key in kept if key[0] == "entity_name_counts"} == {("Renamed", "open")}


def test_counts_stay_exact_under_concurrent_writes(servers, environment, fresh_database_url):
    server = servers.start(GUNICORN, environment)
    login = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})[1]
    token, admin_id = login["access_token"], login["user"]["id"]
    shuffle = random.Random(11)

    def create(n: int) -> tuple[int, dict]:
        task = {
            "entity_name": f"Race {n}",
            "task_type": ("Call", "Meeting", "Email")[n % 3],
            "task_time": "2025-01-01",
            "contact_person_id": admin_id,
        }
        return call("POST", f"{server.url}/api/tasks", task, token)

    with ThreadPoolExecutor(max_workers=12) as pool:
        ids = [body["task"]["id"] for status, body in pool.map(create, range(120)) if status == 201]
    assert len(ids) == 120
    operations = [("PATCH", "/api/tasks/bulk-status", {"task_ids": shuffle.sample(ids, 60), "status": s}) for s in
                  ["open", "closed"] * 20]  # fmt: skip
    operations += [("PUT", f"/api/tasks/{task_id}", {"task_type": "Review"}) for task_id in ids[:30]]
    due_days = [f"2025-01-{n % 28 + 1:02d}T09:00:00.{n:06d}Z" for n in range(30)]  # moves between due days
    operations += [
        ("PUT", f"/api/tasks/{task_id}", {"task_time": day}) for task_id, day in zip(ids[80:110], due_days, strict=True)
    ]
    operations += [("PATCH", f"/api/tasks/{task_id}/status", {"status": "closed"}) for task_id in ids[30:60]]
    operations += [("PUT", f"/api/tasks/{task_id}", {"entity_name": f"Race {n % 3}"}) for n, task_id in
                   enumerate(ids[110:120])]  # fmt: skip
    operations += [("DELETE", f"/api/tasks/{task_id}", None) for task_id in ids[60:80]]
    operations += [("POST", "/api/tasks", None)] * 40
    shuffle.shuffle(operations)

    def run(operation):
        method, path, body = operation
        if method == "POST":
            return create(shuffle.randrange(1000))[0]
        return call(method, f"{server.url}{path}", body, token)[0]

    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(run, operations))

    assert set(statuses) <= {200, 201, 404}, Counter(statuses)
    engine = sa.create_engine(fresh_database_url)
    with engine.connect() as connection:
        kept, recounted = kept_and_recounted(connection)
    engine.dispose()
    assert kept == recounted
    assert sum(n for key, n in kept.items() if key[0] == "task_counts") == 120 - 20 + 40
    server.stop()
    assert "Traceback" not in server.log.read_text()


def test_replacing_a_task_in_one_statement_keeps_the_counts_exact(app, make_task):
    """SQLite's INSERT OR REPLACE deletes the old row (counted thanks to recursive triggers); PostgreSQL's upsert
    updates it."""
    task = make_task(status="open", task_type="Call")
    replacement = {
        "id": uuid.UUID(task["id"]),
        "entity_name": "ABC Corporation",
        "task_type": "Meeting",
        "task_time": datetime(2025, 1, 1, tzinfo=UTC),
        "date_created": datetime(2025, 1, 1, tzinfo=UTC),
        "updated_at": datetime(2025, 1, 1, tzinfo=UTC),
        "status": "closed",
        "closed_at": datetime(2025, 1, 2, tzinfo=UTC),
    }
    with app.app_context():
        if db.session.get_bind().dialect.name == "sqlite":
            statement = sa.insert(Task).prefix_with("OR REPLACE").values(replacement)
        else:
            statement = postgresql.insert(Task).values(replacement)
            statement = statement.on_conflict_do_update(index_elements=[Task.id], set_=dict(statement.excluded))
        db.session.execute(statement)
        db.session.commit()

    assert assert_counts_exact(app) == {("closed", "Meeting", None): 1}
