import uuid

from helpers import assert_error
from models import User, db


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
    assert response.get_json() == {
        "summary": {"total_tasks": 6, "open_tasks": 4, "closed_tasks": 2},
        "task_types": [{"type": "Call", "count": 3}, {"type": "Meeting", "count": 2}, {"type": "Email", "count": 1}],
        "user_tasks": [
            {"user": "Bob Brown", "user_id": bob["id"], "count": 3},
            {"user": "Alice Adams", "user_id": user["id"], "count": 2},
            {"user": "Unassigned", "user_id": None, "count": 1},
        ],
    }


def test_dashboard_of_no_tasks(client, auth_headers):
    assert client.get("/api/analytics/dashboard", headers=auth_headers).get_json() == {
        "summary": {"total_tasks": 0, "open_tasks": 0, "closed_tasks": 0},
        "task_types": [],
        "user_tasks": [],
    }


def test_dashboard_is_one_statement_over_the_kept_counts(client, auth_headers, make_task, sql_statements):
    for _ in range(30):
        make_task()

    with sql_statements() as statements:
        response = client.get("/api/analytics/dashboard", headers=auth_headers)

    assert response.get_json()["summary"]["total_tasks"] == 30
    task_queries = [s for s in statements if "task" in s]
    assert len(task_queries) == 1
    assert "FROM task_counts" in task_queries[0]
    assert "FROM tasks" not in task_queries[0]
    assert task_queries[0].count("GROUP BY") == 3


def test_dashboard_requires_a_token(client):
    assert_error(client.get("/api/analytics/dashboard"), 401)
