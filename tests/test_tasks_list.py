"""GET /api/tasks: pagination, every filter, sorting, strict parameters, and a fixed number of statements."""

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from itsdangerous import URLSafeSerializer
from sqlalchemy import select

from helpers import assert_error
from models import Task, db
from schemas import TaskSchema, dump_page


def listed(client, headers, query: str = "") -> dict:
    response = client.get(f"/api/tasks{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def ids(body: dict) -> list[str]:
    return [task["id"] for task in body["tasks"]]


def test_list_pages_newest_first_by_default(client, auth_headers, make_task):
    start = datetime(2025, 3, 1, tzinfo=UTC)
    tasks = [make_task(date_created=start + timedelta(hours=n)) for n in range(25)]

    body = listed(client, auth_headers)

    assert set(body) == {"tasks", "pagination"}
    next_cursor = body["pagination"].pop("next_cursor")
    assert body["pagination"] == {
        "page": 1, "per_page": 20, "total": 25, "pages": 2, "has_next": True, "has_prev": False,
    }  # fmt: skip
    assert isinstance(next_cursor, str)
    assert ids(body) == [task["id"] for task in reversed(tasks)][:20]
    assert body["tasks"][0] == tasks[-1]

    second = listed(client, auth_headers, "?page=2")
    assert second["pagination"] == {
        "page": 2, "per_page": 20, "total": 25, "pages": 2, "has_next": False, "has_prev": True, "next_cursor": None,
    }  # fmt: skip
    assert ids(second) == [task["id"] for task in reversed(tasks)][20:]


def test_list_page_past_the_end_is_empty(client, auth_headers, make_task):
    make_task()

    body = listed(client, auth_headers, "?page=5")

    assert body["tasks"] == []
    assert body["pagination"]["total"] == 1


def test_list_caps_per_page_at_100(client, auth_headers):
    assert listed(client, auth_headers, "?per_page=500")["pagination"]["per_page"] == 100
    assert listed(client, auth_headers, "?per_page=100")["pagination"]["per_page"] == 100
    assert listed(client, auth_headers, "?per_page=1")["pagination"]["per_page"] == 1


def test_list_of_no_tasks(client, auth_headers):
    assert listed(client, auth_headers) == {
        "tasks": [],
        "pagination": {
            "page": 1,
            "per_page": 20,
            "total": 0,
            "pages": 0,
            "has_next": False,
            "has_prev": False,
            "next_cursor": None,
        },
    }


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("page=abc", "page"),
        ("page=0", "page"),
        ("page=-1", "page"),
        ("page=1.5", "page"),
        ("page=", "page"),
        ("page=10000000000", "page"),
        ("page=1_0", "page"),
        ("page=%201", "page"),
        ("page=%2B1", "page"),
        ("per_page=%D9%A1", "per_page"),
        ("per_page=0", "per_page"),
        ("per_page=-5", "per_page"),
        ("per_page=ten", "per_page"),
        ("sort_by=password_hash", "sort_by"),
        ("sort_by=contact_person", "sort_by"),
        ("sort_order=up", "sort_order"),
        ("sort_order=", "sort_order"),
        ("status=done", "status"),
        ("status=", "status"),
        ("contact_person_id=42", "contact_person_id"),
        ("date_from=yesterday", "date_from"),
        ("date_to=2025-02-30", "date_to"),
        ("date_from=2025-07-02&date_to=2025-07-01", "date_from"),
        ("date_from=2025-07-01T12:00:00Z&date_to=2025-07-01T11:00:00Z", "date_from"),
        ("entity_name=%00", "entity_name"),
        ("task_type=" + "x" * 51, "task_type"),
        ("colour=red", "colour"),
        ("status=open&status=closed", "status"),
    ],
)
def test_list_rejects_bad_parameters(client, auth_headers, query, parameter):
    assert_error(client.get(f"/api/tasks?{query}", headers=auth_headers), 400, parameter)


def test_list_filters_by_status(client, auth_headers, make_task):
    closed = make_task(status="closed")
    make_task(status="open")

    assert ids(listed(client, auth_headers, "?status=closed")) == [closed["id"]]


def test_list_filters_by_contact_person(client, auth_headers, make_task, other_user):
    theirs = make_task(contact_person_id=uuid.UUID(other_user["id"]))
    make_task()

    assert ids(listed(client, auth_headers, f"?contact_person_id={other_user['id']}")) == [theirs["id"]]


@pytest.mark.parametrize(
    ("parameter", "value"),
    [("entity_name", "corp"), ("entity_name", "ABC CORP"), ("task_type", "FOLLOW"), ("task_type", "up")],
)
def test_list_partial_filters_ignore_case(client, auth_headers, make_task, parameter, value):
    match = make_task(entity_name="ABC Corporation", task_type="Follow-up")
    make_task(entity_name="Zeta Holdings", task_type="Call")

    assert ids(listed(client, auth_headers, f"?{parameter}={value}")) == [match["id"]]


@pytest.mark.parametrize(
    ("stored", "query"),
    [("MÜLLER GmbH", "müller"), ("ΣΑΣΑ Holdings", "ΣΑΣ"), ("ΣΑΣΑ Holdings", "σασ"), ("İSTANBUL Ltd", "istanbul")],  # noqa: RUF001
)
def test_list_partial_filter_folds_case_beyond_ascii_alike_on_both_databases(
    client, auth_headers, make_task, stored, query
):
    match = make_task(entity_name=stored)
    make_task(entity_name="Muller Inc")

    body = listed(client, auth_headers, f"?entity_name={query}")

    assert ids(body) == [match["id"]]
    assert body["pagination"]["total"] == 1  # summed from the kept names, folded alike


@pytest.mark.parametrize(
    ("value", "expected"),
    [("100%25", ["100% Capital"]), ("_", ["Snake_Case Ltd"]), ("%25", ["100% Capital"]), ("a/b", ["A/B Partners"])],
)
def test_list_partial_filters_treat_wildcards_literally(client, auth_headers, make_task, value, expected):
    for name in ("100% Capital", "1000 Capital", "Snake_Case Ltd", "SnakeXCase Ltd", "A/B Partners", "AB Partners"):
        make_task(entity_name=name)

    body = listed(client, auth_headers, f"?entity_name={value}")

    assert [task["entity_name"] for task in body["tasks"]] == expected
    assert body["pagination"]["total"] == len(expected)


@pytest.fixture
def july_tasks(make_task):
    """Tasks created around 1 July 2025, by name."""
    moments = {
        "june-30-late": datetime(2025, 6, 30, 23, 59, 59, tzinfo=UTC),
        "july-1-start": datetime(2025, 7, 1, 0, 0, 0, tzinfo=UTC),
        "july-1-noon": datetime(2025, 7, 1, 12, 0, 0, tzinfo=UTC),
        "july-1-end": datetime(2025, 7, 1, 23, 59, 59, 999999, tzinfo=UTC),
        "july-2-start": datetime(2025, 7, 2, 0, 0, 0, tzinfo=UTC),
    }
    return {name: make_task(date_created=moment, entity_name=name)["id"] for name, moment in moments.items()}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("date_from=2025-07-01", ["july-1-start", "july-1-noon", "july-1-end", "july-2-start"]),
        ("date_to=2025-07-01", ["june-30-late", "july-1-start", "july-1-noon", "july-1-end"]),
        ("date_from=2025-07-01&date_to=2025-07-01", ["july-1-start", "july-1-noon", "july-1-end"]),
        ("date_to=2025-07-01T12:00:00Z", ["june-30-late", "july-1-start", "july-1-noon"]),
        ("date_from=2025-07-01T12:00:00Z", ["july-1-noon", "july-1-end", "july-2-start"]),
        ("date_from=2025-07-01T12:00:00Z&date_to=2025-07-01T12:00:00Z", ["july-1-noon"]),
        ("date_to=2025-07-01T14:00:00%2B02:00", ["june-30-late", "july-1-start", "july-1-noon"]),
        ("date_to=2025-07-01T12:00:00", ["june-30-late", "july-1-start", "july-1-noon"]),
        ("date_from=2025-07-02&date_to=9999-12-31", ["july-2-start"]),
        ("date_from=20250701&date_to=20250701", ["july-1-start", "july-1-noon", "july-1-end"]),
    ],
)
def test_list_date_bounds_are_inclusive(client, auth_headers, july_tasks, query, expected):
    body = listed(client, auth_headers, f"?{query}&sort_by=date_created&sort_order=asc")

    assert ids(body) == [july_tasks[name] for name in expected]


@pytest.mark.parametrize("sort_by", ["date_created", "task_time", "entity_name", "task_type", "status", "updated_at"])
@pytest.mark.parametrize("sort_order", ["asc", "desc"])
def test_list_sorts_by_each_field(client, auth_headers, make_task, sort_by, sort_order):
    base = datetime(2025, 1, 1, tzinfo=UTC)
    for n, (name, kind, status) in enumerate([("Beta", "Meeting", "open"), ("Alpha", "Call", "closed"),
                                              ("Gamma", "Email", "open")]):  # fmt: skip
        make_task(
            entity_name=name, task_type=kind, status=status,
            date_created=base + timedelta(days=n), updated_at=base + timedelta(days=10 - n),
            task_time=base + timedelta(days=(n + 1) % 3),
        )  # fmt: skip

    tasks = listed(client, auth_headers, f"?sort_by={sort_by}&sort_order={sort_order}")["tasks"]

    values = [task[sort_by] for task in tasks]
    assert values == sorted(values, reverse=sort_order == "desc")
    assert len(values) == 3


def test_list_order_of_ties_is_stable_across_pages(client, auth_headers, make_task):
    same_moment = datetime(2025, 5, 5, tzinfo=UTC)
    created = {make_task(date_created=same_moment)["id"] for _ in range(7)}

    pages = [ids(listed(client, auth_headers, f"?per_page=3&page={page}")) for page in (1, 2, 3)]

    assert sum(len(page) for page in pages) == 7
    assert set().union(*pages) == created


def test_list_combines_filters(client, auth_headers, make_task, other_user):
    match = make_task(status="open", task_type="Call", entity_name="ABC Corporation",
                      contact_person_id=uuid.UUID(other_user["id"]))  # fmt: skip
    make_task(status="closed", task_type="Call", entity_name="ABC Corporation",
              contact_person_id=uuid.UUID(other_user["id"]))  # fmt: skip
    make_task(status="open", task_type="Meeting", entity_name="ABC Corporation")

    query = f"?status=open&task_type=call&entity_name=abc&contact_person_id={other_user['id']}"
    body = listed(client, auth_headers, query)

    assert ids(body) == [match["id"]]
    assert body["pagination"]["total"] == 1


@pytest.mark.parametrize("per_page", [1, 10, 100])
def test_list_takes_a_fixed_number_of_statements_whatever_the_page_size(
    client, auth_headers, make_task, make_user, sql_statements, per_page
):
    people = [make_user(f"person{n}") for n in range(5)]
    for n in range(100):
        make_task(contact_person_id=uuid.UUID(people[n % 5]["id"]), created_by_id=uuid.UUID(people[-n % 5]["id"]))

    with sql_statements() as statements:
        body = listed(client, auth_headers, f"?per_page={per_page}")

    assert len(body["tasks"]) == per_page
    assert all(task["contact_person"] and task["created_by"] for task in body["tasks"])
    # The token's user, and the page with both people joined in and the total counted alongside.
    assert len(statements) == 2, statements


def test_a_page_past_the_last_still_gives_the_total(client, auth_headers, make_task, sql_statements):
    for _ in range(3):
        make_task()

    with sql_statements() as statements:
        body = listed(client, auth_headers, "?per_page=2&page=3")

    assert body["tasks"] == []
    assert body["pagination"] | {"next_cursor": None} == {
        "page": 3, "per_page": 2, "total": 3, "pages": 2, "has_next": False, "has_prev": True, "next_cursor": None
    }  # fmt: skip
    assert len(statements) == 3, statements  # no row to bring the total: counted on its own


def test_a_page_dumps_each_person_on_it_once(app, client, auth_headers, make_task, make_user):
    people = [make_user(f"person{n}") for n in range(3)]
    for n in range(30):
        make_task(contact_person_id=uuid.UUID(people[n % 3]["id"]), created_by_id=uuid.UUID(people[0]["id"]))

    body = listed(client, auth_headers, "?per_page=30")
    with app.app_context():
        dumped = dump_page(TaskSchema(), db.session.scalars(select(Task)).all())

    by_id = {}
    for task in dumped:  # one dict per person, however many tasks name them
        for person in (task["contact_person"], task["created_by"]):
            assert by_id.setdefault(person["id"], person) is person
    assert sorted(by_id) == sorted(person["id"] for person in people)
    for task in body["tasks"]:  # each task still names its own people, in full
        assert task["contact_person"] == by_id[task["contact_person"]["id"]]
        assert task["created_by"]["id"] == people[0]["id"]
    single = client.get(f"/api/tasks/{body['tasks'][0]['id']}", headers=auth_headers).get_json()["task"]
    assert single == body["tasks"][0]


@pytest.mark.parametrize("sort_by", ["entity_name", "task_type"])
def test_list_sorts_text_ignoring_case(client, auth_headers, make_task, sort_by):
    for name in ("beta", "Alpha", "alpha two", "Gamma", "ALPHA THREE"):
        make_task(**{sort_by: name})

    tasks = listed(client, auth_headers, f"?sort_by={sort_by}&sort_order=asc")["tasks"]

    assert [task[sort_by] for task in tasks] == ["Alpha", "ALPHA THREE", "alpha two", "beta", "Gamma"]


def walk(client, headers, query: str) -> list[dict]:
    """Every page of the list, following next_cursor from the first page."""
    pages = [listed(client, headers, query)]
    while pages[-1]["pagination"]["next_cursor"]:
        pages.append(listed(client, headers, f"?cursor={pages[-1]['pagination']['next_cursor']}"))
    return pages


@pytest.mark.parametrize("sort_order", ["asc", "desc"])
@pytest.mark.parametrize("sort_by", ["date_created", "task_time", "entity_name", "task_type", "status", "updated_at"])
def test_cursor_pages_follow_the_offset_order_through_ties(client, auth_headers, make_task, sort_by, sort_order):
    shuffle = random.Random(f"{sort_by}{sort_order}")
    names = ["beta", "Alpha", "alpha", "ALPHA", "Gamma"]
    moments = [datetime(2025, 3, day, 9, tzinfo=UTC) for day in (1, 2, 3)]  # few values: many ties
    for _ in range(23):
        make_task(
            entity_name=shuffle.choice(names),
            task_type=shuffle.choice(names),
            status=shuffle.choice(["open", "closed"]),
            task_time=shuffle.choice(moments),
            date_created=shuffle.choice(moments),
            updated_at=shuffle.choice(moments),
        )
    query = f"?sort_by={sort_by}&sort_order={sort_order}&per_page=5"

    pages = walk(client, auth_headers, query)

    everything = listed(client, auth_headers, f"?sort_by={sort_by}&sort_order={sort_order}&per_page=100")
    assert [task_id for page in pages for task_id in ids(page)] == ids(everything)
    assert [page["pagination"]["page"] for page in pages] == [1, 2, 3, 4, 5]
    assert [page["pagination"]["has_prev"] for page in pages] == [False, True, True, True, True]
    assert [page["pagination"]["has_next"] for page in pages] == [True, True, True, True, False]
    assert {(page["pagination"]["total"], page["pagination"]["pages"]) for page in pages} == {(23, 5)}


def test_a_cursor_brings_its_filters_and_sort(client, auth_headers, make_task):
    for n in range(12):
        make_task(status=("open", "closed")[n % 3 == 0], entity_name=f"Client {n:02}")
    query = "?status=open&sort_by=entity_name&sort_order=asc&per_page=3"
    cursor = listed(client, auth_headers, query)["pagination"]["next_cursor"]

    alone = listed(client, auth_headers, f"?cursor={cursor}")
    repeated = listed(client, auth_headers, f"{query}&cursor={cursor}")
    longer = listed(client, auth_headers, f"?cursor={cursor}&per_page=100")

    assert [task["entity_name"] for task in alone["tasks"]] == ["Client 05", "Client 07", "Client 08"]
    assert repeated["tasks"] == alone["tasks"]
    assert [task["entity_name"] for task in longer["tasks"]] == ["Client 05", "Client 07", "Client 08", "Client 10",
                                                                 "Client 11"]  # fmt: skip
    assert longer["pagination"] | {"next_cursor": None} == {
        "page": 2, "per_page": 100, "total": 8, "pages": 1, "has_next": False, "has_prev": True, "next_cursor": None,
    }  # fmt: skip


def test_a_cursor_refuses_a_changed_query_a_page_and_forgery(app, client, auth_headers, make_task):
    for _ in range(3):
        make_task()
    cursor = listed(client, auth_headers, "?status=open&per_page=1")["pagination"]["next_cursor"]
    with app.app_context():
        forged = URLSafeSerializer("another secret", salt="tasks-list-cursor").dumps(
            {"query": {}, "after": ["2025-01-01T00:00:00+00:00", str(uuid.uuid4())], "page": 2}
        )

    assert_error(client.get(f"/api/tasks?cursor={cursor}&status=closed", headers=auth_headers), 400, "status")
    assert_error(client.get(f"/api/tasks?cursor={cursor}&sort_by=task_time", headers=auth_headers), 400, "sort_by")
    assert_error(client.get(f"/api/tasks?cursor={cursor}&page=2", headers=auth_headers), 400, "page")
    assert_error(client.get(f"/api/tasks?cursor={cursor[:-2]}", headers=auth_headers), 400, "cursor")
    assert_error(client.get(f"/api/tasks?cursor={forged}", headers=auth_headers), 400, "cursor")
    assert_error(client.get("/api/tasks?cursor=", headers=auth_headers), 400, "cursor")


def test_cursor_pages_neither_skip_nor_repeat_while_tasks_are_added(client, auth_headers, make_task):
    start = datetime(2025, 3, 1, tzinfo=UTC)
    for n in range(10):
        make_task(date_created=start + timedelta(hours=n))
    before = ids(listed(client, auth_headers, "?per_page=100"))
    first = listed(client, auth_headers, "?per_page=5")
    for n in range(3):  # newer tasks arrive on top while the reader is on page 1
        make_task(date_created=start + timedelta(days=1, hours=n))

    second = listed(client, auth_headers, f"?cursor={first['pagination']['next_cursor']}")

    assert ids(first) + ids(second) == before
    offset_second = listed(client, auth_headers, "?per_page=5&page=2")
    assert ids(offset_second) != before[5:]  # what offset pagination would have shown instead


def test_a_cursor_page_takes_the_same_statements_as_page_one(client, auth_headers, make_task, sql_statements):
    for _ in range(30):
        make_task()
    cursor = listed(client, auth_headers, "?per_page=10")["pagination"]["next_cursor"]

    with sql_statements() as statements:
        body = listed(client, auth_headers, f"?cursor={cursor}&per_page=10")

    assert len(body["tasks"]) == 10
    assert len(statements) == 2, statements  # the token's user; the page, its total alongside


def test_a_cursor_may_repeat_its_query_as_the_client_spells_it(client, auth_headers, make_task):
    for n in range(3):
        make_task(date_created=datetime(2025, 3, 1 + n, tzinfo=UTC))
    cursor = listed(client, auth_headers, "?per_page=1&date_from=2025-01-01")["pagination"]["next_cursor"]

    # The defaults spelt out, and the same date in its basic format, change nothing.
    body = listed(client, auth_headers, f"?cursor={cursor}&sort_by=date_created&sort_order=desc&date_from=20250101")

    assert body["pagination"]["page"] == 2
    assert len(body["tasks"]) == 1


def test_a_cursor_after_a_long_non_ascii_value_with_every_filter_works(client, auth_headers, make_task, user):
    shuffle = random.Random(7)  # random CJK: the cursor's JSON escapes each to six characters and cannot compress it
    name = "".join(chr(shuffle.randrange(0x4E00, 0x9FFF)) for _ in range(250))
    for _ in range(3):
        make_task(entity_name=name, task_type="Call", status="open")
    query = (
        f"?per_page=1&sort_by=entity_name&status=open&task_type=call&entity_name={name[:2]}"
        f"&contact_person_id={user['id']}&date_from=2020-01-01&date_to=2030-12-31"
    )
    cursor = listed(client, auth_headers, query)["pagination"]["next_cursor"]
    assert len(cursor) > 1000

    second = listed(client, auth_headers, f"?cursor={cursor}")

    assert second["pagination"]["page"] == 2
    assert second["tasks"][0]["entity_name"] == name


def test_a_polling_client_gets_a_304_while_the_page_is_unchanged(client, auth_headers, make_task):
    task = make_task()
    first = client.get("/api/tasks?per_page=5", headers=auth_headers)
    etag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == "private, no-cache"

    unchanged = client.get("/api/tasks?per_page=5", headers=auth_headers | {"If-None-Match": etag})
    assert (unchanged.status_code, unchanged.get_data(), unchanged.headers["ETag"]) == (304, b"", etag)

    assert client.put(f"/api/tasks/{task['id']}", json={"note": "changed"}, headers=auth_headers).status_code == 200
    changed = client.get("/api/tasks?per_page=5", headers=auth_headers | {"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["ETag"] != etag
    assert changed.get_json()["tasks"][0]["note"] == "changed"
    other_page = client.get("/api/tasks?per_page=4", headers=auth_headers | {"If-None-Match": etag})
    assert other_page.status_code == 200  # another query, another page


@pytest.mark.parametrize("path", ["/api/tasks", "/api/analytics/dashboard"])
def test_if_match_on_a_polled_read_changes_nothing(client, auth_headers, make_task, path):
    """If-Match belongs to writes: on the list and the dashboard it is ignored, never a 412 with the answer as
    its body; If-None-Match "*" matches any answer."""
    make_task()
    plain = client.get(path, headers=auth_headers)

    with_if_match = client.get(path, headers=auth_headers | {"If-Match": '"not-this-one"'})
    assert with_if_match.status_code == 200
    assert with_if_match.get_json().keys() == plain.get_json().keys()
    assert client.get(path, headers=auth_headers | {"If-None-Match": "*"}).status_code == 304
