"""Idempotency-Key: a retried create or bulk update returns the first response and changes nothing more."""

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from helpers import GUNICORN, assert_error, call, call_with_headers
from models import IdempotencyKey, Task, TaskEvent, db


def new_task(user_id: str, **overrides) -> dict:
    return {
        "entity_name": "ABC Corporation",
        "task_type": "Call",
        "task_time": "2025-01-01T09:00:00Z",
        "contact_person_id": user_id,
    } | overrides


def count(app, model) -> int:
    with app.app_context():
        return db.session.scalar(sa.select(sa.func.count()).select_from(model))


def test_a_retried_create_returns_the_first_response_and_creates_nothing(app, client, auth_headers, user):
    headers = auth_headers | {"Idempotency-Key": "create-1"}

    first = client.post("/api/tasks", json=new_task(user["id"]), headers=headers)
    retry = client.post("/api/tasks", json=new_task(user["id"]), headers=headers)

    assert first.status_code == retry.status_code == 201
    assert retry.get_json() == first.get_json()
    assert retry.headers["ETag"] == first.headers["ETag"] == '"1"'
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert count(app, Task) == 1
    assert count(app, TaskEvent) == 1


def test_the_same_body_in_another_key_order_is_the_same_request(app, client, auth_headers, user):
    headers = auth_headers | {"Idempotency-Key": "order"}
    body = new_task(user["id"])

    client.post("/api/tasks", json=body, headers=headers)
    retry = client.post("/api/tasks", json=dict(reversed(list(body.items()))), headers=headers)

    assert retry.status_code == 201 and retry.headers["Idempotent-Replayed"] == "true"
    assert count(app, Task) == 1


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/api/tasks", {"note": "another body"}),
        ("PATCH", "/api/tasks/bulk-status", None),  # another URL
    ],
)
def test_the_same_key_for_another_request_is_a_422_and_changes_nothing(
    app, client, auth_headers, user, make_task, method, path, body
):
    headers = auth_headers | {"Idempotency-Key": "reused"}
    client.post("/api/tasks", json=new_task(user["id"]), headers=headers)
    other = new_task(user["id"], **body) if body else {"task_ids": [make_task()["id"]], "status": "closed"}
    tasks_before = count(app, Task)

    response = client.open(path, method=method, json=other, headers=headers)

    assert_error(response, 422, "Idempotency-Key")
    assert count(app, Task) == tasks_before
    with app.app_context():
        assert db.session.scalars(sa.select(Task.status)).all().count("closed") == 0


def test_keys_belong_to_their_user(app, client, auth_headers, other_headers, user):
    for headers in (auth_headers, other_headers):
        response = client.post("/api/tasks", json=new_task(user["id"]), headers=headers | {"Idempotency-Key": "k"})
        assert response.status_code == 201
        assert "Idempotent-Replayed" not in response.headers
    assert count(app, Task) == 2


def test_a_retried_bulk_update_returns_the_first_response_and_records_nothing_more(
    app, client, auth_headers, make_task
):
    tasks = [make_task()["id"] for _ in range(3)]
    headers = auth_headers | {"Idempotency-Key": str(uuid.uuid4())}
    body = {"task_ids": tasks, "status": "closed"}

    first = client.patch("/api/tasks/bulk-status", json=body, headers=headers)
    client.patch(f"/api/tasks/{tasks[0]}/status", json={"status": "open"}, headers=auth_headers)  # meanwhile
    retry = client.patch("/api/tasks/bulk-status", json=body, headers=headers)

    assert retry.status_code == first.status_code == 200
    assert retry.get_json() == first.get_json() == {"message": "Status set to closed for 3 task(s).", "updated": 3}
    assert retry.headers["Idempotent-Replayed"] == "true"
    with app.app_context():
        assert db.session.get(Task, uuid.UUID(tasks[0])).status == "open"  # the retry did not close it again
    assert count(app, TaskEvent) == 4


def test_a_key_expires_after_24_hours(app, client, auth_headers, user):
    headers = auth_headers | {"Idempotency-Key": "old"}
    client.post("/api/tasks", json=new_task(user["id"]), headers=headers)
    with app.app_context():
        key = db.session.scalar(sa.select(IdempotencyKey))
        assert key.expires_at - key.created_at == timedelta(hours=24)
        db.session.execute(sa.update(IdempotencyKey).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        db.session.commit()

    again = client.post("/api/tasks", json=new_task(user["id"], note="new"), headers=headers)

    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
    assert count(app, Task) == 2


def test_a_failed_request_keeps_no_key_so_the_retry_runs(app, client, auth_headers, user, make_user):
    gone = make_user("gone", is_active=False)
    headers = auth_headers | {"Idempotency-Key": "fails-first"}

    failed = client.post("/api/tasks", json=new_task(gone["id"]), headers=headers)
    retry = client.post("/api/tasks", json=new_task(user["id"]), headers=headers)

    assert_error(failed, 400, "contact_person_id")
    assert retry.status_code == 201 and "Idempotent-Replayed" not in retry.headers
    assert count(app, Task) == 1


@pytest.mark.parametrize("key", ["", " ", "x" * 256, "with space", "ünïcode"])
def test_an_unusable_key_is_a_400(app, client, auth_headers, user, key):
    response = client.post(
        "/api/tasks",
        json=new_task(user["id"]),
        headers=auth_headers | {"Idempotency-Key": key.encode().decode("latin-1")},
    )

    assert_error(response, 400, "Idempotency-Key")
    assert count(app, Task) == 0


def test_purge_idempotency_keys_removes_the_expired_ones_only(app, client, auth_headers, user):
    for key in ("a", "b"):
        client.post("/api/tasks", json=new_task(user["id"]), headers=auth_headers | {"Idempotency-Key": key})
    with app.app_context():
        db.session.execute(
            sa.update(IdempotencyKey).where(IdempotencyKey.key == "a").values(expires_at=datetime.now(UTC))
        )
        db.session.commit()

    result = app.test_cli_runner().invoke(args=["purge-idempotency-keys"])

    assert result.exit_code == 0
    assert "Purged 1 expired idempotency keys." in result.output
    with app.app_context():
        assert db.session.scalars(sa.select(IdempotencyKey.key)).all() == ["b"]


def test_retries_racing_each_other_create_one_task_and_all_get_its_response(servers, environment, fresh_database_url):
    server = servers.start(GUNICORN, environment)
    token = call("POST", f"{server.url}/api/auth/login", {"username": "admin", "password": "admin123"})[1][
        "access_token"
    ]
    admin_id = call("GET", f"{server.url}/api/auth/me", token=token)[1]["user"]["id"]
    racers, rounds = 8, 5
    for round_ in range(rounds):
        barrier = threading.Barrier(racers)
        results = []

        def post(key: str, barrier: threading.Barrier, results: list):
            barrier.wait()
            status, body, headers = call_with_headers(
                "POST", f"{server.url}/api/tasks", new_task(admin_id), token, {"Idempotency-Key": key}
            )
            results.append((status, body, headers.get("Idempotent-Replayed")))

        arguments = (f"race-{round_}", barrier, results)
        threads = [threading.Thread(target=post, args=arguments) for _ in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert {status for status, _, _ in results} == {201}, results
        assert len({body["task"]["id"] for _, body, _ in results}) == 1, results
        assert sorted(replayed or "" for _, _, replayed in results) == [""] + ["true"] * (racers - 1)

    engine = sa.create_engine(fresh_database_url)
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM tasks")).scalar() == rounds
        assert connection.execute(sa.text("SELECT count(*) FROM task_events")).scalar() == rounds
    engine.dispose()
    server.stop()
    assert "Traceback" not in server.log.read_text()
