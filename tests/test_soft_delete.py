"""Soft delete: a deleted task is hidden everywhere until it is restored, or purged for good by a command."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from helpers import assert_error
from models import Task, TaskEvent, db


def deleted_at(app, task_id: str):
    with app.app_context():
        task = db.session.get(Task, uuid.UUID(task_id))
        return "purged" if task is None else task.deleted_at


def listed_ids(client, headers, query: str = "") -> list[str]:
    response = client.get(f"/api/tasks?per_page=100{query}", headers=headers)
    assert response.status_code == 200, response.get_json()
    return [task["id"] for task in response.get_json()["tasks"]]


def test_a_deleted_task_is_hidden_from_every_read_and_write(client, auth_headers, admin_headers, make_task):
    kept, gone = make_task(), make_task()
    client.delete(f"/api/tasks/{gone['id']}", headers=auth_headers)
    url = f"/api/tasks/{gone['id']}"

    assert listed_ids(client, auth_headers) == [kept["id"]]
    assert client.get("/api/tasks", headers=auth_headers).get_json()["pagination"]["total"] == 1
    assert client.get("/api/tasks?entity_name=abc", headers=auth_headers).get_json()["pagination"]["total"] == 1
    assert client.get("/api/analytics/dashboard", headers=auth_headers).get_json()["summary"]["total_tasks"] == 1
    for headers in (auth_headers, admin_headers):
        assert_error(client.get(url, headers=headers), 404)
        assert_error(client.put(url, json={"note": "x"}, headers=headers), 404)
        assert_error(client.patch(f"{url}/status", json={"status": "closed"}, headers=headers), 404)
        assert_error(client.delete(url, headers=headers), 404)
        bulk = client.patch(
            "/api/tasks/bulk-status", json={"task_ids": [kept["id"], gone["id"]], "status": "closed"}, headers=headers
        )
        assert assert_error(bulk, 404)["details"] == {"not_found": [gone["id"]]}


def test_deleted_tasks_are_listed_on_request_all_for_admins_and_their_own_for_others(
    client, auth_headers, other_headers, admin_headers, make_task, user, other_user
):
    mine = make_task()
    theirs = make_task(created_by_id=uuid.UUID(other_user["id"]))
    live = make_task()
    for task, headers in ((mine, auth_headers), (theirs, other_headers)):
        assert client.delete(f"/api/tasks/{task['id']}", headers=headers).status_code == 200

    assert listed_ids(client, auth_headers, "&deleted=true") == [mine["id"]]
    assert listed_ids(client, other_headers, "&deleted=true") == [theirs["id"]]
    assert sorted(listed_ids(client, admin_headers, "&deleted=true")) == sorted([mine["id"], theirs["id"]])
    assert listed_ids(client, admin_headers, "&deleted=false") == [live["id"]]
    page = client.get("/api/tasks?deleted=true&per_page=1", headers=admin_headers).get_json()
    assert page["pagination"]["total"] == 2
    assert page["tasks"][0]["deleted_at"] is not None
    following = client.get(f"/api/tasks?cursor={page['pagination']['next_cursor']}", headers=admin_headers)
    assert [t["deleted_at"] is not None for t in following.get_json()["tasks"]] == [True]


def test_deleted_must_be_a_boolean(client, auth_headers):
    assert_error(client.get("/api/tasks?deleted=maybe", headers=auth_headers), 400, "deleted")


def test_the_creator_restores_a_task_as_it_was(app, client, auth_headers, make_task):
    task = make_task(note="keep me")
    client.delete(f"/api/tasks/{task['id']}", headers=auth_headers)

    response = client.post(f"/api/tasks/{task['id']}/restore", headers=auth_headers)

    assert response.status_code == 200
    restored = response.get_json()["task"]
    assert response.get_json()["message"] == "Task restored."
    assert restored["deleted_at"] is None and restored["note"] == "keep me"
    assert restored["version"] == task["version"] + 2  # deleted, then restored
    assert listed_ids(client, auth_headers) == [task["id"]]
    assert client.get("/api/analytics/dashboard", headers=auth_headers).get_json()["summary"]["total_tasks"] == 1


def test_only_the_creator_or_an_admin_restores(client, auth_headers, other_headers, admin_headers, make_task):
    task = make_task()
    client.delete(f"/api/tasks/{task['id']}", headers=auth_headers)

    # For anyone else the deleted task is hidden, as from the list and the history.
    assert_error(client.post(f"/api/tasks/{task['id']}/restore", headers=other_headers), 404)
    assert client.post(f"/api/tasks/{task['id']}/restore", headers=admin_headers).status_code == 200


def test_restoring_a_live_task_is_a_conflict_and_an_unknown_one_is_a_404(client, auth_headers, make_task):
    task = make_task()

    assert_error(client.post(f"/api/tasks/{task['id']}/restore", headers=auth_headers), 409)
    assert_error(client.post(f"/api/tasks/{uuid.uuid4()}/restore", headers=auth_headers), 404)


def test_the_assignee_may_change_a_task_but_not_delete_or_restore_it(
    client, auth_headers, other_headers, make_task, other_user
):
    task = make_task(contact_person_id=uuid.UUID(other_user["id"]))

    assert client.put(f"/api/tasks/{task['id']}", json={"note": "mine too"}, headers=other_headers).status_code == 200
    assert_error(client.delete(f"/api/tasks/{task['id']}", headers=other_headers), 403)
    client.delete(f"/api/tasks/{task['id']}", headers=auth_headers)
    assert_error(client.post(f"/api/tasks/{task['id']}/restore", headers=other_headers), 404)


def age_deletions(app, days_by_id: dict[str, int]) -> None:
    now = datetime.now(UTC)
    with app.app_context():
        for task_id, days in days_by_id.items():
            db.session.execute(
                sa.update(Task).where(Task.id == uuid.UUID(task_id)).values(deleted_at=now - timedelta(days=days))
            )
        db.session.commit()


def test_purge_deleted_removes_tasks_deleted_long_enough_ago_only(app, client, auth_headers, make_task, monkeypatch):
    monkeypatch.setattr("commands.PURGE_BATCH_SIZE", 2)  # several batches
    old = [make_task()["id"] for _ in range(5)]
    recent, live = make_task()["id"], make_task()["id"]
    for task_id in [*old, recent]:
        client.delete(f"/api/tasks/{task_id}", headers=auth_headers)
    age_deletions(app, dict.fromkeys(old, 91) | {recent: 89})

    dry = app.test_cli_runner().invoke(args=["purge-deleted", "--dry-run"])
    assert dry.exit_code == 0 and "5 task(s)" in dry.output
    assert all(deleted_at(app, task_id) != "purged" for task_id in old)

    result = app.test_cli_runner().invoke(args=["purge-deleted", "--older-than", "90d"])

    assert result.exit_code == 0, result.output
    assert "Purged 5 task(s)" in result.output
    assert [deleted_at(app, task_id) for task_id in old] == ["purged"] * 5
    assert deleted_at(app, recent) not in ("purged", None)
    assert deleted_at(app, live) is None
    with app.app_context():
        purged_events = db.session.scalars(sa.select(TaskEvent.task_id).where(TaskEvent.action == "purged")).all()
    assert sorted(map(str, purged_events)) == sorted(old)
    client.post(f"/api/tasks/{recent}/restore", headers=auth_headers)
    assert sorted(listed_ids(client, auth_headers)) == sorted([recent, live])


@pytest.mark.parametrize("age, days", [("12w", 84), ("36h", 1.5), ("0d", 0)])
def test_purge_deleted_reads_weeks_days_and_hours(app, client, auth_headers, make_task, age, days):
    older, newer = make_task()["id"], make_task()["id"]
    for task_id in (older, newer):
        client.delete(f"/api/tasks/{task_id}", headers=auth_headers)
    age_deletions(app, {older: days + 0.1, newer: max(days - 0.1, -1)})

    result = app.test_cli_runner().invoke(args=["purge-deleted", "--older-than", age])

    assert result.exit_code == 0, result.output
    assert deleted_at(app, older) == "purged"
    assert deleted_at(app, newer) != "purged"


@pytest.mark.parametrize("age", ["90", "d", "-5d", "1.5d", "9y", "99999999999999999d"])
def test_purge_deleted_refuses_an_unreadable_age(app, age):
    result = app.test_cli_runner().invoke(args=["purge-deleted", "--older-than", age])

    assert result.exit_code == 2
    assert "--older-than" in result.output
