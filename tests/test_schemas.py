"""schemas.py's page dumper: the same answer as marshmallow's own dump, for every kind of row a page holds."""

import uuid
from datetime import UTC, datetime

import pytest
from marshmallow import Schema, fields, post_dump
from sqlalchemy import select

from models import Task, TaskEvent, db
from schemas import TaskEventSchema, TaskSchema, UserSchema, dump_page, page_dumper


def test_a_page_of_tasks_dumps_as_marshmallow_dumps_it(app, client, auth_headers, user, other_user, make_task):
    bob = uuid.UUID(other_user["id"])
    make_task()
    make_task(contact_person_id=None, note=None, entity_name="Müller & Söhne 😀", task_type="E-mail")
    make_task(status="closed", closed_by_id=bob, contact_person_id=bob, note="=SUM(A1)")
    make_task(deleted_at=datetime(2025, 2, 1, tzinfo=UTC), task_time=datetime(9999, 12, 31, 23, 59, 59, 999999, UTC))
    leap_day = datetime(2024, 2, 29, tzinfo=UTC)
    make_task(created_by_id=bob, task_time=datetime(1, 1, 1, tzinfo=UTC), date_created=leap_day)
    created = {"entity_name": "ABC Corporation", "task_type": "Call", "task_time": "2025-01-15T10:00:00Z"}
    created = client.post("/api/tasks", json=created | {"contact_person_id": user["id"]}, headers=auth_headers)
    task_id = created.get_json()["task"]["id"]
    for change in ({"note": "first"}, {"task_type": "Meeting"}):  # history: created and updated events
        assert client.put(f"/api/tasks/{task_id}", json=change, headers=auth_headers).status_code == 200
    closing = client.patch(f"/api/tasks/{task_id}/status", json={"status": "closed"}, headers=auth_headers)
    assert closing.status_code == 200

    with app.app_context():
        tasks = db.session.scalars(select(Task)).all()
        events = db.session.scalars(select(TaskEvent)).all()
        assert len(tasks) == 6 and len(events) == 4
        assert dump_page(TaskSchema(), tasks) == TaskSchema().dump(tasks, many=True)
        assert dump_page(TaskEventSchema(), events) == TaskEventSchema().dump(events, many=True)
        assert dump_page(UserSchema(), [task.created_by for task in tasks]) == UserSchema().dump(
            [task.created_by for task in tasks], many=True
        )


def test_schemas_the_page_dumper_cannot_copy_are_refused():
    class WithHook(Schema):
        name = fields.String()

        @post_dump
        def shout(self, data, **kwargs):
            return {key: value.upper() for key, value in data.items()}

    class WithMethod(Schema):
        name = fields.Method("name_of")

        def name_of(self, obj):
            return obj.name

    class WithPath(Schema):
        name = fields.String(attribute="owner.name")

    class WithSome(Schema):
        owner = fields.Nested(UserSchema, only=("id",))

    for schema in (WithHook, WithMethod, WithPath, WithSome):
        with pytest.raises(TypeError, match="marshmallow"):
            page_dumper(schema)
    with pytest.raises(TypeError, match="marshmallow"):
        dump_page(TaskSchema(only=("id",)), [])
