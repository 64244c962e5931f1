"""The dashboard: every figure checked against a recount in Python of a fixed set of tasks, unfiltered and under each
filter, with tasks exactly at the boundaries of each period and deleted tasks that must not count."""

import random
import statistics
import uuid
from collections import Counter
from datetime import UTC, datetime, time, timedelta
from itertools import pairwise

import pytest
import sqlalchemy as sa

from helpers import POSTGRES_URL, assert_error
from models import Task, User, db

MICROSECOND = timedelta(microseconds=1)
DAY, WEEK = timedelta(days=1), timedelta(weeks=1)
OLD_KEYS = ("summary", "task_types", "user_tasks")


@pytest.fixture
def frozen_now(monkeypatch):
    """Freeze the dashboard's clock at ``now`` (the real now unless given), so each boundary can be hit exactly."""

    def freeze(now: datetime | None = None) -> datetime:
        now = now or datetime.now(UTC)
        monkeypatch.setattr("routes.analytics.utcnow", lambda: now)
        return now

    return freeze


def week_starts(now: datetime) -> list[datetime]:
    """The Mondays 00:00 UTC of the 12 weeks, oldest first, and of the next."""
    monday = datetime.combine(now.date() - timedelta(days=now.weekday()), time.min, tzinfo=UTC)
    return [monday - (11 - n) * WEEK for n in range(13)]


def boundaries(now: datetime) -> list[datetime]:
    """Every moment a figure changes at, as of ``now``."""
    midnight = datetime.combine(now.date() + DAY, time.min, tzinfo=UTC)
    return [now, midnight, now + 7 * DAY, now - 7 * DAY, now - 30 * DAY, *week_starts(now)]


def insert_tasks(app, rows: list[dict]) -> list[dict]:
    """Insert the tasks (any Task column) in one statement; returns them as inserted, with their defaults."""
    filled = []
    for given in rows:
        row = {"id": uuid.uuid4(), "entity_name": "ABC Corporation", "task_type": "Call", "status": "open"} | given
        row.setdefault("date_created", row.get("task_time"))
        row.setdefault("task_time", row["date_created"])
        row.setdefault("updated_at", row["date_created"])
        row.setdefault("contact_person_id", None)
        row.setdefault("closed_at", None)
        row.setdefault("deleted_at", None)
        filled.append(row)
    with app.app_context():
        db.session.execute(sa.insert(Task), filled)
        db.session.commit()
    return filled


def fixed_tasks(now: datetime, people: list[uuid.UUID | None]) -> list[dict]:
    """Tasks at every boundary (just before it, at it) as open, closed and deleted ones, and some spread around,
    with assignees, types, entities and times to close (microseconds included) taken in turn."""
    shuffle = random.Random(7)
    moments = []
    for boundary in boundaries(now):
        moments += [boundary - MICROSECOND, boundary, boundary + MICROSECOND]
    moments += [now - shuffle.uniform(0, 100) * DAY for _ in range(40)]
    moments += [now + shuffle.uniform(0, 10) * DAY for _ in range(10)]
    moments += [now - 400 * DAY, now + 400 * DAY]
    rows = []
    for n, moment in enumerate(moments):
        common = {
            "task_type": ("Call", "Meeting", "KYC check")[n % 3],
            "entity_name": ("ABC Corporation", "Müller & Söhne GmbH", "Northwind Trust")[n % 3 - 1],
            "contact_person_id": people[n % len(people)],
        }
        took = timedelta(hours=shuffle.uniform(0, 400), microseconds=shuffle.randrange(1_000_000))
        rows += [
            # due at the moment, created a while before
            common | {"task_time": moment, "date_created": moment - took},
            # created at the moment
            common | {"date_created": moment, "task_time": moment + took, "status": ("open", "closed")[n % 2],
                      "closed_at": moment + took if n % 2 else None},
            # closed at the moment, after the time it took
            common | {"date_created": moment - took, "task_time": moment, "status": "closed", "closed_at": moment},
            # deleted: never counted
            common | {"date_created": moment, "task_time": moment, "status": ("open", "closed")[n % 2],
                      "closed_at": moment if n % 2 else None, "deleted_at": now},
        ]  # fmt: skip
    return rows


def matches(task: dict, query: dict) -> bool:
    """Does the task pass the list's filters, as given in the query string?"""
    if task["deleted_at"] is not None:
        return False
    if "status" in query and task["status"] != query["status"]:
        return False
    for field in ("task_type", "entity_name"):
        if field in query and query[field].lower() not in task[field].lower():
            return False
    if "contact_person_id" in query and str(task["contact_person_id"]) != query["contact_person_id"]:
        return False
    if "date_from" in query and task["date_created"] < datetime.fromisoformat(query["date_from"]).replace(tzinfo=UTC):
        return False
    end = datetime.fromisoformat(query.get("date_to", "9999-12-30")).replace(tzinfo=UTC) + DAY  # the whole day
    return task["date_created"] < end


def recount(tasks: list[dict], now: datetime, query: dict, names: dict) -> dict:
    """The dashboard as its definitions say, from the tasks themselves."""
    live = [task for task in tasks if matches(task, query)]
    open_tasks = [task for task in live if task["status"] == "open"]
    closed = [task for task in live if task["closed_at"] is not None]
    midnight = datetime.combine(now.date() + DAY, time.min, tzinfo=UTC)
    weeks = week_starts(now)
    recent = [(t["closed_at"] - t["date_created"]).total_seconds() for t in closed if t["closed_at"] >= now - 30 * DAY]
    people = Counter(task["contact_person_id"] for task in live)
    return {
        "as_of": now.isoformat(),
        "summary": {"total_tasks": len(live), "open_tasks": len(open_tasks), "closed_tasks": len(closed)},
        "task_types": dict(Counter(task["task_type"] for task in live)),
        "user_tasks": {str(person) if person else None: (names[person], n) for person, n in people.items()},
        "due": {
            "overdue": sum(task["task_time"] < now for task in open_tasks),
            "today": sum(now <= task["task_time"] < midnight for task in open_tasks),
            "next_7_days": sum(now <= task["task_time"] < now + 7 * DAY for task in open_tasks),
        },
        "closed": {
            "last_7_days": sum(task["closed_at"] >= now - 7 * DAY for task in closed),
            "last_30_days": sum(task["closed_at"] >= now - 30 * DAY for task in closed),
            "median_seconds_to_close": statistics.median(recent) if recent else None,
        },
        "weekly": [
            {
                "week_start": start.date().isoformat(),
                "created": sum(start <= task["date_created"] < end for task in live),
                "closed": sum(start <= task["closed_at"] < end for task in closed),
            }
            for start, end in pairwise(weeks)
        ],
    }


def assert_dashboard(body: dict, expected: dict) -> None:
    """Every figure as recounted; the median exact on PostgreSQL, within a microsecond on SQLite."""
    assert body["as_of"] == expected["as_of"]
    assert body["summary"] == expected["summary"]
    assert {row["type"]: row["count"] for row in body["task_types"]} == expected["task_types"]
    assert {row["user_id"]: (row["user"], row["count"]) for row in body["user_tasks"]} == expected["user_tasks"]
    assert body["due"] == expected["due"]
    median, expected_median = (
        body["closed"].pop("median_seconds_to_close"),
        expected["closed"].pop("median_seconds_to_close"),
    )
    assert body["closed"] == expected["closed"]
    if expected_median is None or POSTGRES_URL:
        assert median == expected_median
    else:
        assert median == pytest.approx(expected_median, abs=1e-6)
    assert len(body["weekly"]) == 12
    for week, expected_week in zip(body["weekly"], expected["weekly"], strict=True):
        assert week == expected_week


@pytest.fixture
def fixed_data(app, user, make_user):
    """The fixed tasks as of the real now, assigned to Alice, Bob or nobody."""

    def make(now: datetime) -> tuple[list[dict], dict]:
        bob = make_user("bob", full_name="Bob Brown")
        people = [uuid.UUID(user["id"]), uuid.UUID(bob["id"]), None]
        names = {people[0]: "Alice Adams", people[1]: "Bob Brown", None: "Unassigned"}
        return insert_tasks(app, fixed_tasks(now, people)), names

    return make


def test_dashboard_figures_agree_with_a_recount(client, auth_headers, fixed_data, frozen_now):
    now = frozen_now()
    tasks, names = fixed_data(now)

    body = client.get("/api/analytics/dashboard", headers=auth_headers).get_json()

    expected = recount(tasks, now, {}, names)
    assert_dashboard(body, expected)
    # The data reaches every figure: nothing above is a vacuous zero.
    assert all(body["due"].values()) and body["closed"]["last_7_days"] and body["closed"]["last_30_days"]
    assert all(week["created"] and week["closed"] for week in body["weekly"])


@pytest.mark.parametrize(
    "query",
    [
        {"status": "open"},
        {"status": "closed"},
        {"contact_person_id": "ALICE"},
        {"contact_person_id": "BOB", "status": "closed"},
        {"task_type": "call"},
        {"task_type": "K"},  # "KYC check"
        {"entity_name": "müller"},
        {"entity_name": "north", "status": "open"},
        {"date_from": "DAYS-20"},
        {"date_from": "DAYS-60", "date_to": "DAYS-10", "status": "closed"},
        {"date_to": "DAYS-0"},
        {"contact_person_id": "ALICE", "task_type": "meeting", "date_from": "DAYS-90", "entity_name": "abc"},
    ],
)
def test_each_filter_applies_to_every_figure(client, auth_headers, fixed_data, frozen_now, user, query):
    now = frozen_now()
    tasks, names = fixed_data(now)
    people = {"ALICE": user["id"], "BOB": next(str(p) for p in names if p and str(p) != user["id"])}
    query = {
        name: people.get(value) or (str((now + int(value[4:]) * DAY).date()) if value.startswith("DAYS") else value)
        for name, value in query.items()
    }

    response = client.get("/api/analytics/dashboard", query_string=query, headers=auth_headers)

    assert response.status_code == 200, response.get_json()
    assert_dashboard(response.get_json(), recount(tasks, now, query, names))


@pytest.mark.parametrize(
    "now",
    [
        datetime(2026, 3, 2, 0, 0, tzinfo=UTC),  # a Monday at midnight: a new week that has just begun
        datetime(2026, 3, 8, 23, 59, 59, 999999, tzinfo=UTC),  # the last microsecond of a Sunday
        datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=UTC),  # a leap day, the 30 days back cross February
        datetime(2026, 12, 31, 18, 0, tzinfo=UTC),  # the weeks cross the new year
    ],
)
def test_figures_at_the_edges_of_days_and_weeks(client, auth_headers, fixed_data, frozen_now, now):
    frozen_now(now)
    tasks, names = fixed_data(now)

    body = client.get("/api/analytics/dashboard", headers=auth_headers).get_json()

    assert_dashboard(body, recount(tasks, now, {}, names))
    assert body["weekly"][-1]["week_start"] == (now - now.weekday() * DAY).date().isoformat()


# The earliest and the latest times the API accepts, and the "no deadline" dates people type.
EXTREME_TIMES = [
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00.000001Z",
    "9999-12-30T23:59:59.999999Z",
    "9999-12-31T00:00:00Z",
    "9999-12-31T12:00:00Z",
    "9999-12-31T23:59:59.999999Z",
]


@pytest.mark.parametrize("query", [{}, {"status": "open"}, {"contact_person_id": "ALICE"}, {"entity_name": "abc"}])
def test_figures_agree_with_a_recount_at_the_earliest_and_latest_times(client, auth_headers, user, other_user, query):
    """Unfiltered and filtered (the index ranges and the grouped path), a task due as late as the API allows is
    due later, never overdue; one due at the start of year 1 is overdue."""
    tasks = []
    for n, task_time in enumerate(EXTREME_TIMES * 2):
        body = {"entity_name": "ABC Corporation", "task_type": "Call", "task_time": task_time}
        body["contact_person_id"] = (user, other_user)[n % 2]["id"]
        task = client.post("/api/tasks", json=body, headers=auth_headers).get_json()["task"]
        if n >= len(EXTREME_TIMES):  # the second round, closed
            path = f"/api/tasks/{task['id']}/status"
            task = client.patch(path, json={"status": "closed"}, headers=auth_headers).get_json()["task"]
        tasks.append(task)
    rows = [
        {
            "status": task["status"],
            "task_type": task["task_type"],
            "entity_name": task["entity_name"],
            "contact_person_id": uuid.UUID(task["contact_person"]["id"]),
            "deleted_at": None,
            **{
                name: task[name] and datetime.fromisoformat(task[name])
                for name in ("date_created", "task_time", "closed_at")
            },
        }
        for task in tasks
    ]
    query = {name: user["id"] if value == "ALICE" else value for name, value in query.items()}
    names = {uuid.UUID(user["id"]): "Alice Adams", uuid.UUID(other_user["id"]): "Bob Brown"}

    body = client.get("/api/analytics/dashboard", query_string=query, headers=auth_headers).get_json()

    assert_dashboard(body, recount(rows, datetime.fromisoformat(body["as_of"]), query, names))
    assert body["due"]["overdue"] == sum(matches(row, query) for row in rows[:2] if row["status"] == "open")


def test_median_of_an_even_number_is_the_mean_of_the_middle_two(app, client, auth_headers, frozen_now):
    now = frozen_now()
    took = [timedelta(hours=1), timedelta(hours=3, microseconds=1), timedelta(days=2), timedelta(days=9)]
    insert_tasks(app, [{"date_created": now - t - DAY, "status": "closed", "closed_at": now - DAY} for t in took])
    insert_tasks(app, [{"date_created": now - 40 * DAY, "status": "closed", "closed_at": now - 31 * DAY}])  # older

    closed = client.get("/api/analytics/dashboard", headers=auth_headers).get_json()["closed"]

    expected = (10800.000001 + 172800) / 2
    assert statistics.median(t.total_seconds() for t in took) == expected
    if POSTGRES_URL:
        assert closed["median_seconds_to_close"] == expected
    else:
        assert closed["median_seconds_to_close"] == pytest.approx(expected, abs=1e-6)
    assert closed["last_30_days"] == 4


def test_dashboard_counts_tasks_by_status_type_and_assignee(app, client, auth_headers, make_task, make_user, user):
    bob = make_user("bob", full_name="Bob Brown")
    leaver = make_user("leaver", full_name="Lee Leaver")
    for status, kind, person in [
        ("open", "Call", bob), ("open", "Call", bob), ("closed", "Call", user), ("closed", "Meeting", bob),
        ("open", "Email", user), ("open", "Meeting", leaver),
    ]:  # fmt: skip
        make_task(status=status, task_type=kind, contact_person_id=uuid.UUID(person["id"]))
    with app.app_context():
        db.session.delete(db.session.get(User, uuid.UUID(leaver["id"])))
        db.session.commit()

    response = client.get("/api/analytics/dashboard", headers=auth_headers)

    assert response.status_code == 200
    assert {key: response.get_json()[key] for key in OLD_KEYS} == {
        "summary": {"total_tasks": 6, "open_tasks": 4, "closed_tasks": 2},
        "task_types": [{"type": "Call", "count": 3}, {"type": "Meeting", "count": 2}, {"type": "Email", "count": 1}],
        "user_tasks": [
            {"user": "Bob Brown", "user_id": bob["id"], "count": 3},
            {"user": "Alice Adams", "user_id": user["id"], "count": 2},
            {"user": "Unassigned", "user_id": None, "count": 1},
        ],
    }


def test_dashboard_of_no_tasks(client, auth_headers, frozen_now):
    now = frozen_now(datetime(2026, 11, 25, 10, 30, tzinfo=UTC))

    assert client.get("/api/analytics/dashboard", headers=auth_headers).get_json() == {
        "as_of": "2026-11-25T10:30:00+00:00",
        "summary": {"total_tasks": 0, "open_tasks": 0, "closed_tasks": 0},
        "task_types": [],
        "user_tasks": [],
        "due": {"overdue": 0, "today": 0, "next_7_days": 0},
        "closed": {"last_7_days": 0, "last_30_days": 0, "median_seconds_to_close": None},
        "weekly": [
            {"week_start": (datetime(2026, 9, 7) + n * WEEK).date().isoformat(), "created": 0, "closed": 0}
            for n in range(12)
        ],
    }
    assert now.weekday() == 2  # the last week started on Monday the 23rd: 11 weeks after 7 September


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?status=closed",
        "?status=open&contact_person_id=ALICE",
        "?task_type=call&entity_name=abc",
        "?date_from=2025-01-01&date_to=2025-12-31",
    ],
)
def test_dashboard_is_one_statement(client, auth_headers, make_task, sql_statements, user, query):
    for status in ["open", "closed"] * 5:
        make_task(status=status)

    with sql_statements() as statements:
        response = client.get(f"/api/analytics/dashboard{query.replace('ALICE', user['id'])}", headers=auth_headers)

    assert response.status_code == 200
    task_queries = [s for s in statements if "task" in s]
    assert len(task_queries) == 1
    if query in ("", "?status=closed"):  # the totals come from the kept counts
        assert "FROM task_counts" in task_queries[0]


def test_unfiltered_totals_come_from_the_kept_counts_and_index_ranges(client, auth_headers, make_task, sql_statements):
    for _ in range(30):
        make_task()

    with sql_statements() as statements:
        response = client.get("/api/analytics/dashboard", headers=auth_headers)

    assert response.get_json()["summary"]["total_tasks"] == 30
    (statement,) = [s for s in statements if "task" in s]
    assert statement.count("FROM task_counts") == 3
    assert "GROUP BY tasks" not in statement  # the tasks are only ever counted, never grouped


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=pending", "status"),
        ("contact_person_id=not-a-uuid", "contact_person_id"),
        ("date_from=yesterday", "date_from"),
        ("date_from=2025-02-01&date_to=2025-01-01", "date_from"),
        ("task_type=" + "x" * 51, "task_type"),
        ("page=2", "page"),
        ("weeks=4", "weeks"),
        ("status=open&status=closed", "status"),
    ],
)
def test_dashboard_rejects_bad_filters(client, auth_headers, query, field):
    assert_error(client.get(f"/api/analytics/dashboard?{query}", headers=auth_headers), 400, field)


def test_dashboard_requires_a_token(client):
    assert_error(client.get("/api/analytics/dashboard"), 401)
