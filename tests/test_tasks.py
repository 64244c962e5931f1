"""Creating, reading, updating, deleting and bulk-closing single tasks (the list is in test_tasks_list.py)."""

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from helpers import assert_error
from models import Task, User, db

TASK_FIELDS = {
    "id", "date_created", "entity_name", "task_type", "task_time", "contact_person", "note", "status",
    "created_by", "updated_at", "version", "closed_at", "closed_by", "deleted_at",
}  # fmt: skip


@pytest.fixture
def new_task(other_user):
    """What the Angular create form sends: note "" and a UTC task_time ending in Z."""
    return {
        "entity_name": "ABC Corporation",
        "task_type": "Meeting",
        "task_time": "2024-12-25T10:00:00Z",
        "contact_person_id": other_user["id"],
        "note": "",
    }


def task_count(app) -> int:
    with app.app_context():
        return db.session.scalar(select(func.count()).select_from(Task))


def stored_task(app, task_id: str) -> Task:
    with app.app_context():
        task = db.session.get(Task, uuid.UUID(task_id))
        db.session.expunge_all()
        return task


def test_create_returns_the_task_with_its_people(client, auth_headers, new_task, user, other_user):
    response = client.post("/api/tasks", json=new_task, headers=auth_headers)

    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == {"message", "task"}
    task = body["task"]
    assert set(task) == TASK_FIELDS
    assert task["entity_name"] == "ABC Corporation"
    assert task["task_type"] == "Meeting"
    assert task["task_time"] in ("2024-12-25T10:00:00Z", "2024-12-25T10:00:00+00:00")
    assert task["note"] == ""
    assert task["status"] == "open"
    assert task["contact_person"]["id"] == other_user["id"]
    assert task["created_by"]["id"] == user["id"]
    assert "password_hash" not in task["contact_person"]
    uuid.UUID(task["id"])
    assert task["date_created"].endswith("+00:00")
    assert client.get(f"/api/tasks/{task['id']}", headers=auth_headers).get_json() == {"task": task}


def test_create_keeps_a_given_status(client, auth_headers, new_task):
    response = client.post("/api/tasks", json=new_task | {"status": "closed"}, headers=auth_headers)

    assert response.status_code == 201
    assert response.get_json()["task"]["status"] == "closed"


def test_create_without_note_stores_null(client, auth_headers, new_task):
    del new_task["note"]

    response = client.post("/api/tasks", json=new_task, headers=auth_headers)

    assert response.status_code == 201
    assert response.get_json()["task"]["note"] is None


def test_create_trims_names(client, auth_headers, new_task):
    response = client.post(
        "/api/tasks", json=new_task | {"entity_name": "  ABC Corp  ", "task_type": " Call "}, headers=auth_headers
    )

    assert response.get_json()["task"]["entity_name"] == "ABC Corp"
    assert response.get_json()["task"]["task_type"] == "Call"


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2024-12-25T10:00:00Z", "2024-12-25T10:00:00+00:00"),
        ("2024-12-25T10:00:00+00:00", "2024-12-25T10:00:00+00:00"),
        ("2024-12-25T12:00:00+02:00", "2024-12-25T10:00:00+00:00"),
        ("2024-12-25T05:30:00-04:30", "2024-12-25T10:00:00+00:00"),
        ("2024-12-25T10:00:00", "2024-12-25T10:00:00+00:00"),
        ("2024-12-25T10:00:00.250000Z", "2024-12-25T10:00:00.250000+00:00"),
    ],
)
def test_task_time_is_stored_in_utc_and_returned_with_offset(app, client, auth_headers, new_task, sent, stored):
    created = client.post("/api/tasks", json=new_task | {"task_time": sent}, headers=auth_headers).get_json()["task"]

    assert created["task_time"] == stored
    assert client.get(f"/api/tasks/{created['id']}", headers=auth_headers).get_json()["task"]["task_time"] == stored
    listed = client.get("/api/tasks", headers=auth_headers).get_json()["tasks"]
    assert [task["task_time"] for task in listed] == [stored]
    assert stored_task(app, created["id"]).task_time == datetime.fromisoformat(stored)


@pytest.mark.parametrize("field", ["entity_name", "task_type", "task_time", "contact_person_id"])
def test_create_requires_each_field(app, client, auth_headers, new_task, field):
    del new_task[field]

    assert_error(client.post("/api/tasks", json=new_task, headers=auth_headers), 400, field)
    assert task_count(app) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("entity_name", ""),
        ("entity_name", "   "),
        ("entity_name", "x" * 256),
        ("entity_name", None),
        ("entity_name", 123),
        ("task_type", ""),
        ("task_type", "x" * 51),
        ("task_time", "tomorrow"),
        ("task_time", "2024-13-01T10:00:00Z"),
        ("task_time", "0001-01-01T00:00:00+01:00"),
        ("task_time", None),
        ("task_time", 1735120800),
        ("contact_person_id", "not-a-uuid"),
        ("contact_person_id", None),
        ("contact_person_id", str(uuid.uuid4())),
        ("note", 42),
        ("note", "x" * 10_001),
        ("note", "nul\x00"),
        ("note", "lone \udc80"),
        ("entity_name", "\ud800 Corp"),
        ("status", "done"),
        ("status", None),
    ],
)
def test_create_rejects_invalid_values(app, client, auth_headers, new_task, field, value):
    assert_error(client.post("/api/tasks", json=new_task | {field: value}, headers=auth_headers), 400, field)
    assert task_count(app) == 0


def test_create_rejects_deactivated_contact_person(app, client, auth_headers, new_task, make_user):
    inactive = make_user("gone", is_active=False)

    response = client.post("/api/tasks", json=new_task | {"contact_person_id": inactive["id"]}, headers=auth_headers)

    assert_error(response, 400, "contact_person_id")
    assert task_count(app) == 0


def test_create_rejects_unknown_fields(app, client, auth_headers, new_task):
    response = client.post("/api/tasks", json=new_task | {"priority": "high"}, headers=auth_headers)

    assert_error(response, 400, "priority")
    assert task_count(app) == 0


def test_create_ignores_read_only_fields(client, auth_headers, new_task, user, other_user):
    sent_id = str(uuid.uuid4())
    echoed = {
        "id": sent_id,
        "date_created": "2000-01-01T00:00:00Z",
        "updated_at": "2000-01-01T00:00:00Z",
        "created_by": {"id": other_user["id"]},
        "contact_person": {"id": user["id"]},
    }

    response = client.post("/api/tasks", json=new_task | echoed, headers=auth_headers)

    assert response.status_code == 201
    task = response.get_json()["task"]
    assert task["id"] != sent_id
    assert not task["date_created"].startswith("2000")
    assert not task["updated_at"].startswith("2000")
    assert task["created_by"]["id"] == user["id"]
    assert task["contact_person"]["id"] == other_user["id"]


def test_get_unknown_task_is_404(client, auth_headers):
    assert_error(client.get(f"/api/tasks/{uuid.uuid4()}", headers=auth_headers), 404)


def test_get_malformed_task_id_is_404(client, auth_headers):
    assert_error(client.get("/api/tasks/not-a-uuid", headers=auth_headers), 404)


def test_task_of_deleted_assignee_shows_null_contact_person(app, client, auth_headers, make_task, make_user):
    leaver = make_user("leaver")
    task = make_task(contact_person_id=uuid.UUID(leaver["id"]))
    with app.app_context():
        db.session.delete(db.session.get(User, uuid.UUID(leaver["id"])))
        db.session.commit()

    response = client.get(f"/api/tasks/{task['id']}", headers=auth_headers)

    assert response.status_code == 200
    assert response.get_json()["task"]["contact_person"] is None


def test_update_changes_only_the_given_fields(client, auth_headers, make_task):
    task = make_task(note="first call")

    response = client.put(f"/api/tasks/{task['id']}", json={"entity_name": "XYZ Ltd"}, headers=auth_headers)

    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"message", "task"}
    assert body["task"]["entity_name"] == "XYZ Ltd"
    changed = ("entity_name", "updated_at", "version")
    assert {k: v for k, v in body["task"].items() if k not in changed} == {
        k: v for k, v in task.items() if k not in changed
    }
    assert datetime.fromisoformat(body["task"]["updated_at"]) > datetime.fromisoformat(task["updated_at"])
    assert body["task"]["version"] == task["version"] + 1


def test_update_with_null_note_clears_it(client, auth_headers, make_task):
    task = make_task(note="to be cleared")

    response = client.put(f"/api/tasks/{task['id']}", json={"note": None}, headers=auth_headers)

    assert response.status_code == 200
    assert response.get_json()["task"]["note"] is None
    assert client.get(f"/api/tasks/{task['id']}", headers=auth_headers).get_json()["task"]["note"] is None


def test_update_as_the_edit_form_sends_it(client, auth_headers, make_task, other_user):
    task = make_task()
    form = {
        "entity_name": "ABC Corporation",
        "task_type": "Follow-up",
        "task_time": "2025-02-01T09:30:00Z",
        "contact_person_id": other_user["id"],
        "note": None,
    }

    response = client.put(f"/api/tasks/{task['id']}", json=form, headers=auth_headers)

    assert response.status_code == 200
    updated = response.get_json()["task"]
    assert updated["task_type"] == "Follow-up"
    assert updated["task_time"] == "2025-02-01T09:30:00+00:00"
    assert updated["contact_person"]["id"] == other_user["id"]
    assert updated["status"] == "open"


def test_update_can_change_status(client, auth_headers, make_task):
    task = make_task()

    response = client.put(f"/api/tasks/{task['id']}", json={"status": "closed"}, headers=auth_headers)

    assert response.get_json()["task"]["status"] == "closed"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("entity_name", None),
        ("entity_name", ""),
        ("task_time", "not a time"),
        ("contact_person_id", None),
        ("contact_person_id", str(uuid.uuid4())),
        ("status", "archived"),
        ("colour", "red"),
    ],
)
def test_update_rejects_invalid_values_and_changes_nothing(app, client, auth_headers, make_task, field, value):
    task = make_task()
    body = {"entity_name": "Changed Name", field: value}

    assert_error(client.put(f"/api/tasks/{task['id']}", json=body, headers=auth_headers), 400, field)
    assert client.get(f"/api/tasks/{task['id']}", headers=auth_headers).get_json()["task"] == task


def test_update_with_nothing_to_change_is_400(client, auth_headers, make_task):
    task = make_task()

    assert_error(client.put(f"/api/tasks/{task['id']}", json={}, headers=auth_headers), 400)
    assert_error(client.put(f"/api/tasks/{task['id']}", json={"id": str(uuid.uuid4())}, headers=auth_headers), 400)


def test_update_ignores_read_only_fields(client, auth_headers, make_task, other_user):
    task = make_task()
    body = {"id": str(uuid.uuid4()), "created_by": {"id": other_user["id"]}, "note": "kept", "date_created": "x"}

    response = client.put(f"/api/tasks/{task['id']}", json=body, headers=auth_headers)

    assert response.status_code == 200
    updated = response.get_json()["task"]
    assert (updated["id"], updated["created_by"], updated["date_created"]) == (
        task["id"],
        task["created_by"],
        task["date_created"],
    )
    assert updated["note"] == "kept"


def test_update_unknown_task_is_404(client, auth_headers):
    assert_error(client.put(f"/api/tasks/{uuid.uuid4()}", json={"note": "x"}, headers=auth_headers), 404)


@pytest.mark.parametrize("status", ["closed", "open"])
def test_patch_status_sets_it(client, auth_headers, make_task, status):
    task = make_task(status="open" if status == "closed" else "closed")

    response = client.patch(f"/api/tasks/{task['id']}/status", json={"status": status}, headers=auth_headers)

    assert response.status_code == 200
    assert set(response.get_json()) == {"message", "task"}
    assert response.get_json()["task"]["status"] == status


@pytest.mark.parametrize("body", [{}, {"status": "done"}, {"status": None}, {"status": "closed", "note": "x"}])
def test_patch_status_rejects_bad_bodies(client, auth_headers, make_task, body):
    task = make_task()

    response = client.patch(f"/api/tasks/{task['id']}/status", json=body, headers=auth_headers)

    assert_error(response, 400)
    assert client.get(f"/api/tasks/{task['id']}", headers=auth_headers).get_json()["task"]["status"] == "open"


def test_patch_status_of_unknown_task_is_404(client, auth_headers):
    assert_error(
        client.patch(f"/api/tasks/{uuid.uuid4()}/status", json={"status": "closed"}, headers=auth_headers), 404
    )


def test_delete_hides_the_task_but_keeps_it_until_purged(app, client, auth_headers, make_task):
    task = make_task()

    response = client.delete(f"/api/tasks/{task['id']}", headers=auth_headers)

    assert response.status_code == 200
    assert set(response.get_json()) == {"message"}
    assert_error(client.get(f"/api/tasks/{task['id']}", headers=auth_headers), 404)
    assert task_count(app) == 1
    assert stored_task(app, task["id"]).deleted_at is not None


def test_delete_unknown_task_is_404(client, auth_headers):
    assert_error(client.delete(f"/api/tasks/{uuid.uuid4()}", headers=auth_headers), 404)


def test_bulk_status_updates_every_task_in_one_update(app, client, auth_headers, make_task, sql_statements):
    tasks = [make_task() for _ in range(5)]
    untouched = make_task()

    with sql_statements() as statements:
        response = client.patch(
            "/api/tasks/bulk-status",
            json={"task_ids": [task["id"] for task in tasks], "status": "closed"},
            headers=auth_headers,
        )

    assert response.status_code == 200
    assert response.get_json() == {"message": "Status set to closed for 5 task(s).", "updated": 5}
    updates = [s for s in statements if s.lstrip().upper().startswith("UPDATE")]
    assert len(updates) == 1
    # Besides it, only the statement that locks the rows in id order, reading no more than the permission check
    # and the trail need: the ids, who created and who is assigned each task, and its status before.
    others = [s for s in statements if s not in updates and "tasks" in s]
    columns = "SELECT tasks.id, tasks.created_by_id, tasks.contact_person_id, tasks.status \nFROM tasks"
    assert len(others) == 1 and others[0].startswith(columns), others
    for task in tasks:
        assert stored_task(app, task["id"]).status == "closed"
    assert stored_task(app, untouched["id"]).status == "open"


def test_bulk_status_with_an_unknown_id_is_404_and_changes_nothing(app, client, auth_headers, make_task):
    tasks = [make_task() for _ in range(3)]
    unknown = str(uuid.uuid4())

    response = client.patch(
        "/api/tasks/bulk-status",
        json={"task_ids": [tasks[0]["id"], unknown, tasks[1]["id"]], "status": "closed"},
        headers=auth_headers,
    )

    body = assert_error(response, 404)
    assert body["details"] == {"not_found": [unknown]}
    assert body["error"] == "No task found for 1 of the ids; nothing was changed."
    assert [stored_task(app, task["id"]).status for task in tasks] == ["open", "open", "open"]


def test_bulk_status_counts_repeated_ids_once(client, auth_headers, make_task):
    task = make_task()

    response = client.patch(
        "/api/tasks/bulk-status", json={"task_ids": [task["id"], task["id"]], "status": "closed"}, headers=auth_headers
    )

    assert response.get_json()["updated"] == 1


def test_bulk_status_keeps_updated_at_of_tasks_already_in_that_status(app, client, auth_headers, make_task):
    closed = make_task(status="closed")
    opened = make_task(status="open")

    client.patch(
        "/api/tasks/bulk-status",
        json={"task_ids": [closed["id"], opened["id"]], "status": "closed"},
        headers=auth_headers,
    )

    assert stored_task(app, closed["id"]).updated_at == datetime.fromisoformat(closed["updated_at"])
    assert stored_task(app, opened["id"]).updated_at > datetime.fromisoformat(opened["updated_at"])


def test_bulk_status_accepts_1000_ids(app, client, auth_headers, user):
    with app.app_context():
        ids = [uuid.uuid4() for _ in range(1000)]
        db.session.add_all(
            Task(id=task_id, entity_name="Bulk Co", task_type="Call", task_time=datetime.now(UTC),
                 contact_person_id=uuid.UUID(user["id"]), created_by_id=uuid.UUID(user["id"]))
            for task_id in ids
        )  # fmt: skip
        db.session.commit()

    response = client.patch(
        "/api/tasks/bulk-status", json={"task_ids": [str(i) for i in ids], "status": "closed"}, headers=auth_headers
    )

    assert response.get_json()["updated"] == 1000
    with app.app_context():
        assert db.session.scalar(select(func.count()).where(Task.status == "closed")) == 1000


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"task_ids": [], "status": "closed"}, "task_ids"),
        ({"task_ids": [str(uuid.uuid4())] * 1001, "status": "closed"}, "task_ids"),
        ({"task_ids": ["not-a-uuid"], "status": "closed"}, "task_ids"),
        ({"task_ids": "all", "status": "closed"}, "task_ids"),
        ({"status": "closed"}, "task_ids"),
        ({"task_ids": [str(uuid.uuid4())], "status": "done"}, "status"),
        ({"task_ids": [str(uuid.uuid4())]}, "status"),
        ({"task_ids": [str(uuid.uuid4())], "status": "closed", "force": True}, "force"),
    ],
)
def test_bulk_status_rejects_bad_bodies(client, auth_headers, body, field):
    assert_error(client.patch("/api/tasks/bulk-status", json=body, headers=auth_headers), 400, field)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/tasks"),
        ("post", "/api/tasks"),
        ("get", "/api/tasks/{id}"),
        ("put", "/api/tasks/{id}"),
        ("patch", "/api/tasks/{id}/status"),
        ("delete", "/api/tasks/{id}"),
        ("patch", "/api/tasks/bulk-status"),
    ],
)
def test_task_endpoints_require_a_token(app, client, make_task, method, path):
    task = make_task()

    response = getattr(client, method)(path.format(id=task["id"]), json={"status": "closed"})

    assert_error(response, 401)
    assert stored_task(app, task["id"]).status == "open"
    assert task_count(app) == 1
