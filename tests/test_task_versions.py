"""Safe concurrent edits: every task has a version, sent as its ETag; If-Match makes a change conditional on it."""

import threading
import uuid

import pytest
import sqlalchemy as sa

from helpers import GUNICORN, assert_error, call, call_with_headers
from models import Task, TaskEvent, db


def stored(app, task_id: str) -> Task:
    with app.app_context():
        return db.session.get(Task, uuid.UUID(task_id))


def event_count(app) -> int:
    with app.app_context():
        return db.session.scalar(sa.select(sa.func.count()).select_from(TaskEvent))


def test_a_task_is_sent_with_its_version_as_etag(client, auth_headers, make_task):
    task = make_task()

    response = client.get(f"/api/tasks/{task['id']}", headers=auth_headers)

    assert response.headers["ETag"] == '"1"'
    assert response.get_json()["task"]["version"] == 1


def test_each_change_moves_the_version_and_the_etag_on(client, auth_headers, make_task):
    task = make_task()
    url = f"/api/tasks/{task['id']}"

    put = client.put(url, json={"note": "one"}, headers=auth_headers)
    patch = client.patch(f"{url}/status", json={"status": "closed"}, headers=auth_headers)

    assert (put.headers["ETag"], put.get_json()["task"]["version"]) == ('"2"', 2)
    assert (patch.headers["ETag"], patch.get_json()["task"]["version"]) == ('"3"', 3)
    assert client.get(url, headers=auth_headers).headers["ETag"] == '"3"'


def test_a_created_task_carries_its_first_etag(client, auth_headers, user):
    body = {
        "entity_name": "ABC",
        "task_type": "Call",
        "task_time": "2025-01-01T09:00:00Z",
        "contact_person_id": user["id"],
    }

    response = client.post("/api/tasks", json=body, headers=auth_headers)

    assert response.status_code == 201
    assert response.headers["ETag"] == '"1"'


@pytest.mark.parametrize("if_match", ['"1"', "1", '"7", "1"', "*"])
def test_a_change_with_a_matching_if_match_applies(client, auth_headers, make_task, if_match):
    task = make_task()

    response = client.put(
        f"/api/tasks/{task['id']}", json={"note": "ok"}, headers=auth_headers | {"If-Match": if_match}
    )

    assert response.status_code == 200
    assert response.get_json()["task"]["note"] == "ok"


@pytest.mark.parametrize("if_match", ['"2"', 'W/"1"', '""', "nonsense"])
def test_a_stale_if_match_is_412_with_the_current_task_and_changes_nothing(
    app, client, auth_headers, make_task, if_match
):
    task = make_task(note="as it was")
    before = event_count(app)

    response = client.put(
        f"/api/tasks/{task['id']}", json={"note": "lost update"}, headers=auth_headers | {"If-Match": if_match}
    )

    body = assert_error(response, 412)
    assert body["details"]["task"] == task
    assert body["details"]["version"] == 1
    assert response.headers["ETag"] == '"1"'
    assert stored(app, task["id"]).note == "as it was"
    assert stored(app, task["id"]).version == 1
    assert event_count(app) == before


def test_status_delete_and_restore_honour_if_match(app, client, auth_headers, make_task):
    task = make_task()
    url = f"/api/tasks/{task['id']}"
    stale = auth_headers | {"If-Match": '"0"'}

    assert_error(client.patch(f"{url}/status", json={"status": "closed"}, headers=stale), 412)
    assert_error(client.delete(url, headers=stale), 412)
    assert stored(app, task["id"]).status == "open" and stored(app, task["id"]).deleted_at is None

    deleted = client.delete(url, headers=auth_headers | {"If-Match": '"1"'})
    assert deleted.status_code == 200 and deleted.headers["ETag"] == '"2"'  # what a conditional restore names
    assert_error(client.post(f"{url}/restore", headers=stale), 412)
    assert stored(app, task["id"]).deleted_at is not None
    restored = client.post(f"{url}/restore", headers=auth_headers | {"If-Match": '"2"'})
    assert restored.status_code == 200
    assert restored.headers["ETag"] == '"3"'


def test_without_if_match_the_last_write_wins(client, auth_headers, make_task):
    task = make_task()
    url = f"/api/tasks/{task['id']}"

    client.put(url, json={"note": "first"}, headers=auth_headers)
    second = client.put(url, json={"note": "second"}, headers=auth_headers)

    assert second.status_code == 200
    assert client.get(url, headers=auth_headers).get_json()["task"]["note"] == "second"


def test_a_bulk_update_moves_the_version_of_the_tasks_it_changed_only(app, client, auth_headers, make_task):
    still_open, already_closed = make_task(), make_task(status="closed")

    client.patch(
        "/api/tasks/bulk-status",
        json={"task_ids": [still_open["id"], already_closed["id"]], "status": "closed"},
        headers=auth_headers,
    )

    assert stored(app, still_open["id"]).version == 2
    assert stored(app, already_closed["id"]).version == 1


@pytest.mark.parametrize("racers", [2, 8])
def test_of_edits_racing_with_the_same_if_match_exactly_one_wins(servers, environment, racers):
    server = servers.start(GUNICORN, environment)
    token = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})[1][
        "access_token"
    ]
    admin_id = call("GET", f"{server.url}/api/auth/me", token=token)[1]["user"]["id"]
    new = {
        "entity_name": "ABC",
        "task_type": "Call",
        "task_time": "2025-01-01T09:00:00Z",
        "contact_person_id": admin_id,
    }
    task = call("POST", f"{server.url}/api/tasks", new, token=token)[1]["task"]
    url = f"{server.url}/api/tasks/{task['id']}"
    barrier = threading.Barrier(racers)
    results = {}

    def edit(n: int):
        barrier.wait()
        results[n] = call_with_headers("PUT", url, {"note": f"edit {n}"}, token, {"If-Match": '"1"'})[:2]

    threads = [threading.Thread(target=edit, args=(n,)) for n in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    statuses = sorted(status for status, _ in results.values())
    assert statuses == [200] + [412] * (racers - 1), results
    [winner] = [n for n, (status, _) in results.items() if status == 200]
    final = call("GET", url, token=token)[1]["task"]
    assert final["note"] == f"edit {winner}" and final["version"] == 2
    for status, body in results.values():
        if status == 412:
            assert body["details"]["task"]["note"] == f"edit {winner}"
    history = call("GET", f"{url}/history", token=token)[1]["events"]
    assert [(e["action"], e["new_value"]) for e in history[1:]] == [("updated", f"edit {winner}")]
    server.stop()
    assert "Traceback" not in server.log.read_text()
