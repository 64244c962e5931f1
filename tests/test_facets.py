"""GET /api/tasks/facets: the filters' values with their counts of live tasks, checked against a recount, in one
statement."""

import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode

import pytest

import schemas
from helpers import assert_error
from models import User, db

TYPES = ["Call", "Email", "Meeting", "Follow-up call", "KYC check"]
ENTITIES = ["ABC Corporation", "abc corp", "Zeta Holdings", "Northwind", "100% Capital", "Corpus Trust", "Snake_Case"]
START = datetime(2025, 3, 1, 9, tzinfo=UTC)


def facets(client, headers, query: str = "") -> dict:
    response = client.get(f"/api/tasks/facets?{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


@pytest.fixture
def people(app, make_user, user) -> dict:
    """Full names by id: alice, bob, carol and, until the data set deletes the account, leaver."""
    others = [make_user(name, full_name=full) for name, full in (("bob", "Bob Brown"), ("carol", "Carol Chen"))]
    leaver = make_user("leaver", full_name="Lee Leaver")
    return {person["id"]: person["full_name"] for person in (user, *others, leaver)}


@pytest.fixture
def data_set(app, make_task, people) -> tuple[list[dict], dict]:
    """80 tasks of every kind, one in eight deleted; then the leaver's account is deleted (their tasks become
    unassigned). Returns the tasks as the recount sees them, and the people by username."""
    ids = {name.split()[0].lower(): person_id for person_id, name in people.items()}
    shuffle = random.Random(20250301)
    tasks = []
    for n in range(80):
        task = {
            "task_type": shuffle.choice(TYPES),
            "entity_name": shuffle.choice(ENTITIES),
            "contact_person_id": shuffle.choice([*people, None]),
            "status": shuffle.choice(["open", "closed"]),
            "date_created": START + timedelta(days=n % 10, minutes=n),
            "deleted": n % 8 == 3,
        }
        make_task(
            task_type=task["task_type"], entity_name=task["entity_name"], status=task["status"],
            contact_person_id=uuid.UUID(task["contact_person_id"]) if task["contact_person_id"] else None,
            date_created=task["date_created"], deleted_at=START if task["deleted"] else None,
        )  # fmt: skip
        tasks.append(task)
    with app.app_context():
        db.session.delete(db.session.get(User, uuid.UUID(ids["lee"])))
        db.session.commit()
    for task in tasks:
        if task["contact_person_id"] == ids["lee"]:
            task["contact_person_id"] = None
    return tasks, ids


def selected(task: dict, query: dict) -> bool:
    """Does the list's filter ``query`` select ``task``? (Its own statement of the contract.)"""
    if task["deleted"]:
        return False
    if "status" in query and task["status"] != query["status"]:
        return False
    for field in ("task_type", "entity_name"):
        if field in query and query[field].lower() not in task[field].lower():
            return False
    if "contact_person_id" in query and task["contact_person_id"] != query["contact_person_id"]:
        return False
    if "date_from" in query and task["date_created"] < datetime.fromisoformat(query["date_from"]).replace(tzinfo=UTC):
        return False
    day_after = datetime.fromisoformat(query.get("date_to", "9999-12-30")).replace(tzinfo=UTC) + timedelta(days=1)
    return task["date_created"] < day_after


def recount(tasks: list[dict], query: dict, names: dict) -> dict:
    """The facets, counted here from the tasks as made."""
    chosen = [task for task in tasks if selected(task, query)]

    def most_first(counts: Counter) -> list[dict]:
        return [{"value": value, "count": n} for value, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]

    assignees = Counter(task["contact_person_id"] for task in chosen)
    return {
        "task_types": most_first(Counter(task["task_type"] for task in chosen)),
        "entity_names": most_first(Counter(task["entity_name"] for task in chosen)),
        "entity_names_total": len({task["entity_name"] for task in chosen}),
        "assignees": [
            {"user_id": person, "user": names[person] if person else "Unassigned", "count": n}
            for person, n in sorted(
                assignees.items(), key=lambda kv: (-kv[1], kv[0] is None, names[kv[0]] if kv[0] else "")
            )
        ],
    }


@pytest.mark.parametrize(
    "query",
    [
        {},
        {"status": "open"},
        {"status": "closed"},
        {"task_type": "call"},
        {"task_type": "KYC check"},
        {"entity_name": "corp"},
        {"entity_name": "100%"},
        {"entity_name": "_"},
        {"contact_person_id": "bob"},
        {"contact_person_id": "lee"},  # the account is gone: its tasks are unassigned now
        {"date_from": "2025-03-04"},
        {"date_to": "2025-03-06"},
        {"date_from": "2025-03-03", "date_to": "2025-03-05", "status": "open"},
        {"status": "open", "task_type": "call", "contact_person_id": "alice"},
        {"task_type": "CALL", "entity_name": "abc"},
    ],
    ids=lambda query: urlencode(query) or "no filter",
)
def test_facets_agree_with_a_recount(client, auth_headers, data_set, people, query):
    tasks, ids = data_set
    if "contact_person_id" in query:
        query = query | {"contact_person_id": ids[query["contact_person_id"]]}

    assert facets(client, auth_headers, urlencode(query)) == recount(tasks, query, people)


def test_facets_orders_most_first_then_by_value(app, client, auth_headers, make_task, make_user, user):
    bob, ann = make_user("bob", full_name="Bob Brown"), make_user("ann", full_name="Ann Archer")
    leaver = make_user("leaver", full_name="Lee Leaver")
    for kind, entity, person in [
        ("Email", "Zeta", bob), ("Email", "Zeta", bob), ("call", "abc", ann), ("Call", "ABC", ann),
        ("Meeting", "Beta", None), ("call", "Zeta", leaver), ("Call", "abc", user),
    ]:  # fmt: skip
        make_task(task_type=kind, entity_name=entity, contact_person_id=uuid.UUID(person["id"]) if person else None)
    make_task(task_type="Call", entity_name="Gone", deleted_at=datetime.now(UTC))
    with app.app_context():
        db.session.delete(db.session.get(User, uuid.UUID(leaver["id"])))
        db.session.commit()

    assert facets(client, auth_headers) == {
        "task_types": [  # ties by code point: capitals first, as Python sorts
            {"value": "Call", "count": 2}, {"value": "Email", "count": 2}, {"value": "call", "count": 2},
            {"value": "Meeting", "count": 1},
        ],
        "entity_names": [
            {"value": "Zeta", "count": 3}, {"value": "abc", "count": 2}, {"value": "ABC", "count": 1},
            {"value": "Beta", "count": 1},
        ],
        "entity_names_total": 4,
        "assignees": [  # the deleted account's task and the unassigned one are one "Unassigned", after the people
            {"user_id": ann["id"], "user": "Ann Archer", "count": 2},
            {"user_id": bob["id"], "user": "Bob Brown", "count": 2},
            {"user_id": None, "user": "Unassigned", "count": 2},
            {"user_id": user["id"], "user": "Alice Adams", "count": 1},
        ],
    }  # fmt: skip


def test_facets_of_no_tasks(client, auth_headers, make_task):
    make_task(deleted_at=datetime.now(UTC))

    assert facets(client, auth_headers) == {
        "task_types": [], "entity_names": [], "entity_names_total": 0, "assignees": [],
    }  # fmt: skip


@pytest.fixture
def five_entities(make_task):
    """Entity names used 5, 4, 3, 2 and 1 times."""
    for uses, name in zip(range(5, 0, -1), ["E5", "E4", "E3", "E2", "E1"], strict=True):
        for _ in range(uses):
            make_task(entity_name=name)


@pytest.mark.parametrize("query", ["limit=2", "limit=2&status=open", "limit=2&date_from=2000-01-01"])
def test_facets_lists_the_most_used_entity_names_up_to_the_limit(client, auth_headers, five_entities, query):
    body = facets(client, auth_headers, query)

    assert body["entity_names"] == [{"value": "E5", "count": 5}, {"value": "E4", "count": 4}]
    assert body["entity_names_total"] == 5
    assert body["task_types"] == [{"value": "Call", "count": 15}]


def test_facets_lists_100_entity_names_unless_asked_and_caps_the_limit(client, auth_headers, make_task, monkeypatch):
    for n in range(101):
        make_task(entity_name=f"Client {n:03d}")

    default = facets(client, auth_headers)
    monkeypatch.setattr(schemas, "MAX_FACET_LIMIT", 3)
    capped = facets(client, auth_headers, "limit=1000")

    assert [row["value"] for row in default["entity_names"]] == [f"Client {n:03d}" for n in range(100)]
    assert default["entity_names_total"] == 101
    assert len(capped["entity_names"]) == 3


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("limit=1.5", "limit"),
        ("limit=", "limit"),
        ("status=done", "status"),
        ("contact_person_id=42", "contact_person_id"),
        ("date_to=2025-02-30", "date_to"),
        ("date_from=2025-07-02&date_to=2025-07-01", "date_from"),
        ("task_type=" + "x" * 51, "task_type"),
        ("sort_by=entity_name", "sort_by"),
        ("page=1", "page"),
        ("colour=red", "colour"),
        ("status=open&status=closed", "status"),
    ],
)
def test_facets_rejects_bad_parameters(client, auth_headers, query, parameter):
    assert_error(client.get(f"/api/tasks/facets?{query}", headers=auth_headers), 400, parameter)


def test_facets_requires_a_token(client):
    assert_error(client.get("/api/tasks/facets"), 401)


@pytest.mark.parametrize(
    ("query", "from_counts", "names_from_counts"),
    [
        ("", True, True),
        ("status=closed", True, True),
        ("status=open&task_type=call", True, False),
        ("entity_name=abc", False, False),
        ("date_from=2025-01-01", False, False),
    ],
)
def test_facets_are_one_statement(
    client, auth_headers, make_task, sql_statements, query, from_counts, names_from_counts
):
    for kind in TYPES:
        make_task(task_type=kind)

    with sql_statements() as statements:
        facets(client, auth_headers, query)

    [statement] = [statement for statement in statements if "task" in statement]
    assert ("FROM task_counts" in statement) is from_counts  # types and assignees, when the counts can tell
    assert ("FROM entity_name_counts" in statement) is names_from_counts  # entity names, when no filter but the status
    assert ("FROM tasks" in statement) is not (from_counts and names_from_counts)  # no task read when both can tell
