"""Who may change a task: everyone sees every task; its creator, its assignee and administrators change it;
its creator and administrators delete it. Anyone else gets a 403 and nothing changes."""

import uuid

import pytest

from helpers import assert_error, token_for
from models import Task, db


@pytest.fixture
def carol(make_user):
    return make_user("carol", full_name="Carol Clark")


@pytest.fixture
def task(make_task, user, other_user):
    """Created by alice, assigned to bob."""
    return make_task(created_by_id=uuid.UUID(user["id"]), contact_person_id=uuid.UUID(other_user["id"]), note="n")


@pytest.fixture
def carol_headers(app, carol):
    return {"Authorization": f"Bearer {token_for(app, carol['id'])}"}


def stored(app, task_id: str) -> Task | None:
    with app.app_context():
        found = db.session.get(Task, uuid.UUID(task_id))
        db.session.expunge_all()
        return found


WRITES = {
    "update": lambda client, task_id, headers: client.put(f"/api/tasks/{task_id}", json={"note": "x"}, headers=headers),
    "status": lambda client, task_id, headers: client.patch(
        f"/api/tasks/{task_id}/status", json={"status": "closed"}, headers=headers
    ),
    "bulk": lambda client, task_id, headers: client.patch(
        "/api/tasks/bulk-status", json={"task_ids": [task_id], "status": "closed"}, headers=headers
    ),
    "delete": lambda client, task_id, headers: client.delete(f"/api/tasks/{task_id}", headers=headers),
}


@pytest.mark.parametrize("write", WRITES)
def test_someone_else_gets_403_and_nothing_changes(app, client, task, carol_headers, write):
    before = stored(app, task["id"])

    body = assert_error(WRITES[write](client, task["id"], carol_headers), 403)

    assert "creator" in body["error"]
    after = stored(app, task["id"])
    assert (after.note, after.status, after.updated_at) == (before.note, before.status, before.updated_at)
    assert client.get(f"/api/tasks/{task['id']}", headers=carol_headers).status_code == 200  # still visible


@pytest.mark.parametrize("write", ["update", "status", "bulk"])
def test_the_assignee_may_change_the_task(client, task, other_headers, write):
    assert WRITES[write](client, task["id"], other_headers).status_code == 200


def test_the_assignee_may_not_delete_the_task(app, client, task, other_headers):
    assert_error(WRITES["delete"](client, task["id"], other_headers), 403)

    assert stored(app, task["id"]) is not None


@pytest.mark.parametrize("write", WRITES)
def test_the_creator_may_do_everything(client, task, auth_headers, write):
    assert WRITES[write](client, task["id"], auth_headers).status_code == 200


@pytest.mark.parametrize("write", WRITES)
def test_an_admin_may_do_everything(client, task, admin_headers, write):
    assert WRITES[write](client, task["id"], admin_headers).status_code == 200


def test_bulk_names_every_task_the_caller_may_not_change_and_changes_none(app, client, make_task, user, carol, task):
    carols = make_task(created_by_id=uuid.UUID(carol["id"]))
    assigned_to_carol = make_task(contact_person_id=uuid.UUID(carol["id"]))
    foreign = make_task()  # alice's, assigned to alice
    ids = [carols["id"], task["id"], assigned_to_carol["id"], foreign["id"]]

    response = client.patch(
        "/api/tasks/bulk-status",
        json={"task_ids": ids, "status": "closed"},
        headers={"Authorization": f"Bearer {token_for(app, carol['id'])}"},
    )

    body = assert_error(response, 403)
    assert body["details"] == {"forbidden": [task["id"], foreign["id"]]}
    assert all(stored(app, task_id).status == "open" for task_id in ids)


def test_unknown_ids_are_404_before_any_403(client, task, carol_headers):
    response = client.patch(
        "/api/tasks/bulk-status", json={"task_ids": [task["id"], str(uuid.uuid4())], "status": "closed"},
        headers=carol_headers,
    )  # fmt: skip

    assert_error(response, 404)
    assert_error(client.delete(f"/api/tasks/{uuid.uuid4()}", headers=carol_headers), 404)


def test_a_task_whose_creator_was_deleted_is_changed_by_its_assignee_or_an_admin(
    client, make_task, other_user, other_headers, admin_headers
):
    orphan = make_task(created_by_id=None, contact_person_id=uuid.UUID(other_user["id"]))

    assert_error(WRITES["delete"](client, orphan["id"], other_headers), 403)
    assert WRITES["update"](client, orphan["id"], other_headers).status_code == 200
    assert WRITES["delete"](client, orphan["id"], admin_headers).status_code == 200


def test_an_assignee_who_hands_a_task_on_loses_the_right_to_change_it(client, task, other_headers, carol):
    handed_on = client.put(f"/api/tasks/{task['id']}", json={"contact_person_id": carol["id"]}, headers=other_headers)
    assert handed_on.status_code == 200

    assert_error(WRITES["status"](client, task["id"], other_headers), 403)
