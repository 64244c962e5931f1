"""The yardstick of `make bench` (issue 14): the least a Flask app does to answer the task list's first page.

One route, ``GET /api/tasks``: the default list's 20-row SELECT (live tasks, newest first by ``date_created``, with
the columns the list shows: the task's and those of its three people), sent through psycopg2 directly and returned
with ``jsonify``. No token, limiter, ORM, schema, log line or metrics. bench/run.py serves it with gunicorn and the
API's own worker settings (bench/minimal_gunicorn.py) on the benchmark's database, measures its p50 with one client
and its throughput with 16, and states the API's targets as multiples of those figures: machines differ by a factor
of two or more, the ratio to this app measured in the same run does not.
"""

import os
import threading

import psycopg2
from flask import Flask, jsonify

PAGE_SIZE = 20
TASK_COLUMNS = (
    "id", "date_created", "entity_name", "task_type", "task_time", "contact_person_id", "note", "status",
    "created_by_id", "updated_at", "version", "closed_at", "closed_by_id", "deleted_at",
)  # fmt: skip
PERSON_COLUMNS = ("id", "username", "email", "full_name", "is_active", "created_at", "is_admin", "phone", "time_zone")
PEOPLE = {"contact_person": "contact_person_id", "created_by": "created_by_id", "closed_by": "closed_by_id"}
PAGE = (
    "SELECT "
    + ", ".join(
        [f"t.{column}" for column in TASK_COLUMNS]
        + [f"{alias}.{column}" for alias in PEOPLE for column in PERSON_COLUMNS]
    )
    + " FROM tasks t"
    + "".join(f" LEFT JOIN app_users {alias} ON {alias}.id = t.{key}" for alias, key in PEOPLE.items())
    + f" WHERE t.deleted_at IS NULL ORDER BY t.date_created DESC, t.id DESC LIMIT {PAGE_SIZE}"
)

app = Flask(__name__)
connections = threading.local()  # one connection per thread (gthread workers may have several), opened on first use


def database_url() -> str:
    """DATABASE_URL as psycopg2 takes it (the API's spellings postgres:// and postgresql+psycopg2:// too)."""
    url = os.environ["DATABASE_URL"]
    scheme, _, rest = url.partition("://")
    return f"postgresql://{rest}" if scheme in ("postgres", "postgresql+psycopg2") else url


def connection():
    if getattr(connections, "current", None) is None or connections.current.closed:
        connections.current = psycopg2.connect(database_url(), options="-c timezone=UTC")
        connections.current.autocommit = True  # one SELECT: no transaction to open and end around it
    return connections.current


def shown(value):
    return value.isoformat() if hasattr(value, "isoformat") else value


@app.get("/api/tasks")
def tasks():
    """The newest page of tasks, each with its people, as the API's default list shows them."""
    with connection().cursor() as cursor:
        cursor.execute(PAGE)
        rows = cursor.fetchall()
    page = []
    width = len(PERSON_COLUMNS)
    for row in rows:
        task = {column: shown(value) for column, value in zip(TASK_COLUMNS, row, strict=False)}
        for index, person in enumerate(PEOPLE):
            values = row[len(TASK_COLUMNS) + index * width : len(TASK_COLUMNS) + (index + 1) * width]
            task[person] = None if values[0] is None else dict(zip(PERSON_COLUMNS, map(shown, values), strict=True))
        page.append(task)
    return jsonify(tasks=page)
