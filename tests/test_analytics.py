"""The dashboard: every figure checked against a recount in Python of a fixed set of tasks, unfiltered and under each
filter, with tasks exactly at the boundaries of each period and deleted tasks that must not count."""

import random
import re
import statistics
import uuid
from collections import Counter
from datetime import UTC, datetime, time, timedelta
from itertools import pairwise

import pytest
import sqlalchemy as sa

from helpers import assert_error
from models import Task, User, db, time_to_close_bucket
from routes.analytics import dashboard_statement, moments

MICROSECOND = timedelta(microseconds=1)
DAY, WEEK = timedelta(days=1), timedelta(weeks=1)
OLD_KEYS = ("summary", "task_types", "user_tasks")


def week_starts(now: datetime) -> list[datetime]:
    """The Mondays 00:00 UTC of the 12 weeks, oldest first, and of the next."""
    monday = datetime.combine(now.date() - timedelta(days=now.weekday()), time.min, tzinfo=UTC)
    return [monday - (11 - n) * WEEK for n in range(13)]


def day_start(moment: datetime) -> datetime:
    return datetime.combine(moment.date(), time.min, tzinfo=UTC)


def boundaries(now: datetime) -> list[datetime]:
    """Every moment a figure changes at, as of ``now``, and the midnights where the kept days and the index ranges
    at the edges of a window meet."""
    midnight = day_start(now) + DAY
    figures = [now, midnight, now + 7 * DAY, now - 7 * DAY, now - 30 * DAY, *week_starts(now)]
    return [
        *figures,
        day_start(now),
        day_start(now + 7 * DAY),
        day_start(now - 7 * DAY) + DAY,
        day_start(now - 30 * DAY) + DAY,
    ]


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
    """Every figure as recounted, the median exactly (to the last bit of its float) on both databases."""
    assert body["as_of"] == expected["as_of"]
    assert body["summary"] == expected["summary"]
    assert {row["type"]: row["count"] for row in body["task_types"]} == expected["task_types"]
    assert {row["user_id"]: (row["user"], row["count"]) for row in body["user_tasks"]} == expected["user_tasks"]
    assert body["due"] == expected["due"]
    assert body["closed"] == expected["closed"]
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
    assert closed["median_seconds_to_close"] == expected
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


@pytest.mark.parametrize(
    "args", [{}, {"status": "closed"}, {"task_type": "call"}, {"created_from": datetime(2025, 1, 1, tzinfo=UTC)}]
)
def test_dashboard_statement_is_compiled_once(app, args):
    """Built once per set of filters and cached compiled by SQLAlchemy: a statement it cannot cache (one holding its
    values() construct, say) would be compiled again at every request, 10 ms for the unfiltered one."""
    with app.app_context():
        cache = {}
        connection = db.session.connection().execution_options(compiled_cache=cache)
        dialect = connection.dialect.name
        statement = dashboard_statement(dialect, tuple(sorted(args.items())))
        assert dashboard_statement(dialect, tuple(sorted(args.items()))) is statement
        for _ in range(2):
            connection.execute(statement, moments(datetime.now(UTC))).all()
    assert len(cache) == 1


@pytest.mark.parametrize("query", ["", "?status=open", "?status=closed"])
def test_unfiltered_figures_come_from_the_kept_tables_and_the_edges_of_days(
    client, auth_headers, make_task, sql_statements, query
):
    for _ in range(30):
        make_task()

    with sql_statements() as statements:
        response = client.get(f"/api/analytics/dashboard{query}", headers=auth_headers)

    assert response.get_json()["summary"]["total_tasks"] == (0 if query == "?status=closed" else 30)
    (statement,) = [s for s in statements if "task" in s]
    assert statement.count("FROM task_counts") == 1  # read once, grouped three ways
    assert "FROM task_day_counts" in statement
    # The tasks only at the edges of days: due from now to midnight and on the last day, closed on the first day of
    # the 7 and of the 30 days (whose times to close also go to the median).
    assert len(re.findall(r"FROM tasks\b(?!\.)", statement)) == (4 if query == "" else 2)
    with_closed = query != "?status=open"
    assert ("FROM time_to_close_counts" in statement) == ("FROM times_to_close" in statement) == with_closed
    assert "GROUP BY tasks" not in statement  # the tasks are only ever counted, never grouped


MEDIAN_NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def closings_around(now: datetime) -> list[dict]:
    """Tasks closed over 40 days before ``now`` and a few after, each having taken one of many times: a
    microsecond either side of the buckets' edges at every power of ten, ties, none at all, and negative ones."""
    shuffle = random.Random(11)
    took = [0, 0, 0, -1, -(10**9), -(15 * 10**6) - 1]
    for power in range(13):
        for lead in (10, 14, 15, 50, 95, 99):
            edge = lead * 10**power
            took += [edge - 1, edge, edge + 1, edge]
    rows = []
    for microseconds in took:
        closed_at = now - timedelta(days=shuffle.uniform(-3, 40), microseconds=shuffle.randrange(10**6))
        created = closed_at - timedelta(microseconds=microseconds)
        rows.append({"date_created": created, "task_time": created, "status": "closed", "closed_at": closed_at})
    return rows


def closed_figures(tasks: list[dict], now: datetime, query: dict) -> dict:
    closed = [task for task in tasks if matches(task, query) and task["closed_at"] is not None]
    recent = [(t["closed_at"] - t["date_created"]).total_seconds() for t in closed if t["closed_at"] >= now - 30 * DAY]
    return {
        "last_7_days": sum(task["closed_at"] >= now - 7 * DAY for task in closed),
        "last_30_days": len(recent),
        "median_seconds_to_close": statistics.median(recent) if recent else None,
    }


@pytest.mark.parametrize("query", [{}, {"status": "closed"}, {"task_type": "call"}, {"date_from": "2000-01-01"}])
def test_closings_and_their_median_agree_with_a_recount_as_the_window_moves(
    app, client, auth_headers, frozen_now, query
):
    """From the kept tables (unfiltered, by status) and from the tasks (other filters), at moments that move the 30
    days' start across the closings, and put it a microsecond before, at and after one of them."""
    tasks = insert_tasks(app, closings_around(MEDIAN_NOW))
    some_closing = sorted(task["closed_at"] for task in tasks)[len(tasks) // 3]
    moments = [MEDIAN_NOW + timedelta(days=days, hours=days * 5) for days in range(-3, 12)]
    moments += [some_closing + 30 * DAY + offset for offset in (-MICROSECOND, timedelta(0), MICROSECOND)]
    for now in moments:
        frozen_now(now)

        closed = client.get("/api/analytics/dashboard", query_string=query, headers=auth_headers).get_json()["closed"]

        assert closed == closed_figures(tasks, now, query), now
    assert len({len([t for t in tasks if t["closed_at"] >= now - 30 * DAY]) for now in moments}) > 5


@pytest.mark.parametrize("query", [{}, {"task_type": "call"}])
def test_median_of_two_middle_times_in_different_buckets(app, client, auth_headers, frozen_now, query):
    now = frozen_now(MEDIAN_NOW)
    took = [
        1,
        149_999,
        150_000,
        10**9,
    ]  # 149,999 and 150,000 microseconds: the last of one bucket, the first of the next
    assert time_to_close_bucket(took[1]) < time_to_close_bucket(took[2])
    closed_at = now - DAY - 17 * MICROSECOND
    insert_tasks(
        app, [{"date_created": closed_at - t * MICROSECOND, "status": "closed", "closed_at": closed_at} for t in took]
    )

    closed = client.get("/api/analytics/dashboard", query_string=query, headers=auth_headers).get_json()["closed"]

    assert (
        closed["median_seconds_to_close"] == (0.149999 + 0.15) / 2 == statistics.median([1e-06, 0.149999, 0.15, 1000.0])
    )


def dashboard_etag(client, headers: dict, query: str = "") -> str:
    response = client.get(f"/api/analytics/dashboard{query}", headers=headers)
    assert response.status_code == 200
    return response.headers["ETag"]


def test_dashboard_answers_304_without_a_body_while_no_figure_changes(
    client, auth_headers, make_task, frozen_now, sql_statements
):
    frozen_now(datetime(2026, 3, 4, 12, 0, tzinfo=UTC))
    make_task(task_time=datetime(2026, 3, 4, 15, 0, tzinfo=UTC))
    first = client.get("/api/analytics/dashboard", headers=auth_headers)
    etag = first.headers["ETag"]
    assert etag.startswith('W/"')  # weak: the figures are the same, as_of is not
    assert first.headers["Cache-Control"] == "private, no-cache"

    frozen_now(datetime(2026, 3, 4, 14, 59, 59, 999999, tzinfo=UTC))  # later, but no figure has moved
    with sql_statements() as statements:
        again = client.get("/api/analytics/dashboard", headers=auth_headers | {"If-None-Match": etag})

    assert again.status_code == 304
    assert again.data == b""
    assert again.headers["ETag"] == etag
    assert len([s for s in statements if "task" in s]) == 1  # the figures are computed, and the ETag is theirs
    assert client.get("/api/analytics/dashboard", headers=auth_headers | {"If-None-Match": "*"}).status_code == 304
    other = client.get("/api/analytics/dashboard", headers=auth_headers | {"If-None-Match": 'W/"other", ' + etag})
    assert other.status_code == 304


def test_dashboard_etag_changes_when_time_alone_moves_a_figure(client, auth_headers, make_task, frozen_now):
    frozen_now(datetime(2026, 3, 4, 12, 0, tzinfo=UTC))
    make_task(task_time=datetime(2026, 3, 4, 15, 0, tzinfo=UTC))
    etag = dashboard_etag(client, auth_headers)

    frozen_now(datetime(2026, 3, 4, 15, 0, 0, 1, tzinfo=UTC))  # the task is now overdue
    response = client.get("/api/analytics/dashboard", headers=auth_headers | {"If-None-Match": etag})

    assert response.status_code == 200
    assert response.get_json()["due"] == {"overdue": 1, "today": 0, "next_7_days": 0}
    assert response.headers["ETag"] != etag


def test_dashboard_etag_changes_with_a_write_and_with_a_renamed_assignee(
    app, client, auth_headers, make_task, user, frozen_now
):
    frozen_now(datetime(2026, 3, 4, 12, 0, tzinfo=UTC))
    task = make_task()
    etags = [dashboard_etag(client, auth_headers)]
    response = client.put(f"/api/tasks/{task['id']}", json={"note": "A note moves no figure."}, headers=auth_headers)
    assert response.status_code == 200
    assert dashboard_etag(client, auth_headers) == etags[-1]

    response = client.patch(f"/api/tasks/{task['id']}/status", json={"status": "closed"}, headers=auth_headers)
    assert response.status_code == 200
    etags.append(dashboard_etag(client, auth_headers))
    with app.app_context():
        db.session.get(User, uuid.UUID(user["id"])).full_name = "Alice Adams-Baker"
        db.session.commit()
    etags.append(dashboard_etag(client, auth_headers))
    etags.append(dashboard_etag(client, auth_headers, "?status=open"))

    assert len(set(etags)) == 4
    response = client.get("/api/analytics/dashboard", headers=auth_headers | {"If-None-Match": etags[0]})
    assert response.status_code == 200
    assert response.get_json()["user_tasks"][0]["user"] == "Alice Adams-Baker"


def test_dashboard_checks_the_token_and_the_query_before_any_304(client, auth_headers):
    etag = dashboard_etag(client, auth_headers)

    assert_error(client.get("/api/analytics/dashboard", headers={"If-None-Match": etag}), 401)
    response = client.get("/api/analytics/dashboard?status=pending", headers=auth_headers | {"If-None-Match": etag})
    assert_error(response, 400, "status")


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
