"""The audit trail: every change to a task is an event, written in the change's transaction and never altered."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from helpers import assert_error
from models import Task, TaskEvent, db

NEW_TASK = {
    "entity_name": "ABC Corporation",
    "task_type": "Call",
    "task_time": "2025-03-01T09:30:00Z",
    "note": "",
}


def history(client, task_id, headers, query: str = "") -> dict:
    response = client.get(f"/api/tasks/{task_id}/history{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def events_of(app, task_id) -> list[tuple]:
    with app.app_context():
        rows = db.session.scalars(sa.select(TaskEvent).where(TaskEvent.task_id == uuid.UUID(task_id))).all()
        return [(e.action, e.field, e.old_value, e.new_value, str(e.actor_id) if e.actor_id else None) for e in rows]


def test_creating_a_task_records_who_created_it_and_with_what(client, auth_headers, user):
    response = client.post(
        "/api/tasks", json=NEW_TASK | {"contact_person_id": user["id"]}, headers=auth_headers | {"X-Request-ID": "r-1"}
    )
    task = response.get_json()["task"]

    body = history(client, task["id"], auth_headers)

    assert body["task_id"] == task["id"]
    assert body["pagination"] == {
        "page": 1,
        "per_page": 50,
        "total": 1,
        "pages": 1,
        "has_next": False,
        "has_prev": False,
    }
    [event] = body["events"]
    assert event["action"] == "created"
    assert event["field"] is None and event["old_value"] is None
    assert event["new_value"] == {
        "entity_name": "ABC Corporation",
        "task_type": "Call",
        "task_time": "2025-03-01T09:30:00+00:00",
        "contact_person_id": user["id"],
        "note": "",
        "status": "open",
    }
    assert event["actor_id"] == user["id"]
    assert event["actor"]["username"] == "alice"
    assert event["request_id"] == "r-1"
    assert event["occurred_at"] == task["date_created"]


def test_an_update_records_each_field_it_changed_with_old_and_new_values(
    app, client, auth_headers, make_task, user, other_user
):
    task = make_task(note="first")

    response = client.put(
        f"/api/tasks/{task['id']}",
        json={
            "entity_name": "ABC Corporation",  # unchanged: not recorded
            "task_type": "Meeting",
            "note": None,
            "task_time": "2025-02-01T08:00:00+01:00",
            "contact_person_id": other_user["id"],
        },
        headers=auth_headers,
    )

    assert response.status_code == 200
    assert response.get_json()["task"]["version"] == 2  # four fields, one change
    assert response.headers["ETag"] == '"2"'
    assert sorted(events_of(app, task["id"])) == [
        ("updated", "contact_person_id", user["id"], other_user["id"], user["id"]),
        ("updated", "note", "first", None, user["id"]),
        ("updated", "task_time", "2025-01-15T10:00:00+00:00", "2025-02-01T07:00:00+00:00", user["id"]),
        ("updated", "task_type", "Call", "Meeting", user["id"]),
    ]


def test_an_update_that_changes_nothing_records_nothing_and_keeps_the_version(app, client, auth_headers, make_task):
    task = make_task()

    response = client.put(
        f"/api/tasks/{task['id']}", json={"task_type": "Call", "task_time": task["task_time"]}, headers=auth_headers
    )

    assert response.status_code == 200
    assert response.get_json()["task"]["version"] == task["version"] == 1
    assert response.get_json()["task"]["updated_at"] == task["updated_at"]
    assert events_of(app, task["id"]) == []


def test_status_changes_are_recorded_and_set_then_clear_closed_at_and_closed_by(
    app, client, auth_headers, make_task, user
):
    task = make_task()

    closed = client.patch(f"/api/tasks/{task['id']}/status", json={"status": "closed"}, headers=auth_headers)
    reopened = client.put(f"/api/tasks/{task['id']}", json={"status": "open"}, headers=auth_headers)

    closed_task, reopened_task = closed.get_json()["task"], reopened.get_json()["task"]
    assert closed_task["closed_at"] == closed_task["updated_at"]
    assert closed_task["closed_by"]["id"] == user["id"]
    assert reopened_task["closed_at"] is None and reopened_task["closed_by"] is None
    assert events_of(app, task["id"]) == [
        ("status_changed", "status", "open", "closed", user["id"]),
        ("status_changed", "status", "closed", "open", user["id"]),
    ]


def test_a_task_created_closed_is_closed_by_its_creator_when_it_was_created(client, auth_headers, user):
    body = NEW_TASK | {"contact_person_id": user["id"], "status": "closed"}

    task = client.post("/api/tasks", json=body, headers=auth_headers).get_json()["task"]

    assert task["closed_at"] == task["date_created"]
    assert task["closed_by"]["id"] == user["id"]


def test_a_bulk_update_records_one_event_per_task_it_changed(
    app, client, admin_headers, admin, make_task, sql_statements
):
    tasks = [make_task(status=("open", "closed")[n % 3 == 0]) for n in range(9)]
    ids = [task["id"] for task in tasks]

    with sql_statements() as statements:
        response = client.patch(
            "/api/tasks/bulk-status", json={"task_ids": ids, "status": "closed"}, headers=admin_headers
        )

    assert response.get_json()["updated"] == 9
    event_inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT INTO TASK_EVENTS")]
    assert len(event_inserts) == 1  # one statement for the whole batch
    for task in tasks:
        expected = (
            [] if task["status"] == "closed" else [("bulk_status_changed", "status", "open", "closed", admin["id"])]
        )
        assert events_of(app, task["id"]) == expected
    listed = {t["id"]: t for t in client.get("/api/tasks?per_page=100", headers=admin_headers).get_json()["tasks"]}
    for task in tasks:
        after = listed[task["id"]]
        if task["status"] == "open":  # closed by this request: stamped, one version on
            assert after["closed_by"]["id"] == admin["id"] and after["version"] == 2
            assert after["closed_at"] == after["updated_at"]
        else:
            assert after["version"] == 1 and after["closed_at"] == task["closed_at"]


def test_deleting_and_restoring_are_recorded(app, client, auth_headers, make_task, user):
    task = make_task()

    assert client.delete(f"/api/tasks/{task['id']}", headers=auth_headers).status_code == 200
    assert client.post(f"/api/tasks/{task['id']}/restore", headers=auth_headers).status_code == 200

    assert events_of(app, task["id"]) == [
        ("deleted", None, None, None, user["id"]),
        ("restored", None, None, None, user["id"]),
    ]


def test_the_history_of_a_deleted_task_is_for_administrators_only(
    client, auth_headers, admin_headers, other_headers, make_task
):
    task = make_task()
    client.delete(f"/api/tasks/{task['id']}", headers=auth_headers)

    assert_error(client.get(f"/api/tasks/{task['id']}/history", headers=auth_headers), 404)
    assert_error(client.get(f"/api/tasks/{task['id']}/history", headers=other_headers), 404)
    assert [e["action"] for e in history(client, task["id"], admin_headers)["events"]] == ["deleted"]


def test_the_history_of_a_purged_task_stays_for_administrators(app, client, auth_headers, admin_headers, make_task):
    task = make_task()
    client.delete(f"/api/tasks/{task['id']}", headers=auth_headers)
    with app.app_context():
        db.session.execute(sa.update(Task).values(deleted_at=datetime.now(UTC) - timedelta(days=91)))
        db.session.commit()

    result = app.test_cli_runner().invoke(args=["purge-deleted"])

    assert result.exit_code == 0, result.output
    assert [e["action"] for e in history(client, task["id"], admin_headers)["events"]] == ["deleted", "purged"]
    purged = history(client, task["id"], admin_headers)["events"][-1]
    assert purged["actor"] is None and purged["actor_id"] is None
    assert_error(client.get(f"/api/tasks/{task['id']}/history", headers=auth_headers), 404)


def test_the_history_is_paginated_in_either_order(client, auth_headers, make_task):
    task = make_task()
    for n in range(5):
        client.put(f"/api/tasks/{task['id']}", json={"note": f"note {n}"}, headers=auth_headers)

    first = history(client, task["id"], auth_headers, "?per_page=2")
    last = history(client, task["id"], auth_headers, "?per_page=2&page=3")
    newest = history(client, task["id"], auth_headers, "?per_page=2&sort_order=desc")

    assert [e["new_value"] for e in first["events"]] == ["note 0", "note 1"]
    assert first["pagination"] == {
        "page": 1,
        "per_page": 2,
        "total": 5,
        "pages": 3,
        "has_next": True,
        "has_prev": False,
    }
    assert [e["new_value"] for e in last["events"]] == ["note 4"]
    assert last["pagination"]["has_next"] is False and last["pagination"]["has_prev"] is True
    assert [e["new_value"] for e in newest["events"]] == ["note 4", "note 3"]
    assert history(client, task["id"], auth_headers, "?per_page=1000")["pagination"]["per_page"] == 100


@pytest.mark.parametrize(
    "query, field",
    [("?page=0", "page"), ("?per_page=x", "per_page"), ("?sort_order=up", "sort_order"), ("?since=1", "since")],
)
def test_the_history_rejects_bad_parameters(client, auth_headers, make_task, query, field):
    task = make_task()

    assert_error(client.get(f"/api/tasks/{task['id']}/history{query}", headers=auth_headers), 400, field)


def test_the_history_of_an_unknown_task_is_a_404_for_everyone(client, auth_headers, admin_headers):
    for headers in (auth_headers, admin_headers):
        assert_error(client.get(f"/api/tasks/{uuid.uuid4()}/history", headers=headers), 404)


def test_a_change_that_fails_records_nothing(app, client, auth_headers, make_task, make_user):
    task = make_task()
    gone = make_user("gone", is_active=False)

    # The note changes first, then the assignee is refused: the whole request, its events included, is undone.
    response = client.put(
        f"/api/tasks/{task['id']}", json={"note": "changed", "contact_person_id": gone["id"]}, headers=auth_headers
    )

    assert_error(response, 400, "contact_person_id")
    assert events_of(app, task["id"]) == []
    assert client.get(f"/api/tasks/{task['id']}", headers=auth_headers).get_json()["task"]["note"] is None


def test_events_cannot_be_changed_or_removed_even_in_sql(app, client, auth_headers, make_task):
    task = make_task()
    client.put(f"/api/tasks/{task['id']}", json={"note": "audited"}, headers=auth_headers)

    for statement in (sa.update(TaskEvent).values(new_value="forged"), sa.delete(TaskEvent)):
        with app.app_context():
            with pytest.raises(sa.exc.DatabaseError, match="append-only"):
                db.session.execute(statement)
            db.session.rollback()
    assert [e[3] for e in events_of(app, task["id"])] == ["audited"]
