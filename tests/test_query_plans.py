"""The hot paths' query plans at 200,000 tasks, on PostgreSQL: a change that makes one of them slower fails here.

For each hot endpoint, one request through the test client (with a real token) on a database of the module's own,
seeded once with 200,000 tasks, their history and 50 people, and an outbox and one-time links as months of email
leave them (200,000 messages sent, a few hundred still to send or failed; 50,000 links, nearly all used or expired),
then analyzed as autovacuum would have by then. Every statement the request sends is recorded with its parameters
and explained (``EXPLAIN (FORMAT JSON)``, never executed again), and the test asserts, from ``ENDPOINTS``:

1. how many statements the request sends (transaction control aside);
2. that no plan reads a hot table (``HOT_TABLES``) by a sequential scan, or sorts what it read from one but for a
   page (see ``plan_problems``);
3. that the intended indexes are read.

The outbox's delivery runs in no request (a worker claims and marks a message, the sweep reads what is due and parks
what was abandoned, /metrics counts): its steps are called as those callers call them (outbox.py), recorded and
checked alike, from ``OUTBOX_STEPS``.

Plans, not timings: no figure here depends on how busy the machine is, and `make bench` stays the source of those.
Its database is on the suite's PostgreSQL server (else the local one, as test_failure.py's); conftest.py's
``collect_ignore`` leaves it out of the SQLite run, so that `make test` runs it once."""

import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

import pytest
import sqlalchemy as sa
from conftest import APP_ENVIRONMENT, create_schema
from psycopg2.extensions import STATUS_READY
from werkzeug.security import generate_password_hash

import outbox
import tokens
from app import create_app
from helpers import FAST_HASH, PASSWORD, scratch_postgres_database, settings, token_for
from models import OneTimeToken, OutboxMessage, Task, TaskEvent, db, utcnow

TASKS = 200_000
USERS = 50  # staff01 is an administrator, the caller of every request; staff50 is deactivated
SENT_MESSAGES = 200_000
LINKS = 50_000
# The tables no plan may read whole (plan_problems): the tasks and their history, and the outbox and the one-time
# links, which grow with every email sent and every link asked for.
HOT_TABLES = ("tasks", "task_events", "outbox_messages", "one_time_tokens")
# The tables the writes keep for the counts and the dashboard; analyzed, like the hot ones, once, from every row.
KEPT_TABLES = ("task_counts", "entity_name_counts", "task_day_counts", "time_to_close_counts", "times_to_close")
TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE", "ROLLBACK")
# The most rows a sort over the hot tables may keep (LIMIT plus OFFSET): an export batch (1,000), a page of the list
# with the row that tells whether there is a next one (per_page + 1 <= 101), the facets' entity names (<= 1,000).
TOP_N = 1_000
# Task i (1 to TASKS) has id uuid.UUID(int=i); person n (1 to USERS) has id PERSON.format(n).
PERSON = "00000000-0000-4000-8000-{:012x}"
STATISTICS_TARGET = 1_500  # ANALYZE samples 300 x 1,500 = 450,000 rows: more than either table has
FRAGMENT = "kestr"  # in one entity stem of 50: about 2% of the tasks, as the issue's partial match

SEED_USERS = """
INSERT INTO app_users (id, username, email, password_hash, full_name, is_active, created_at, is_admin,
                       email_verified_at)
SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(n), 12, '0'))::uuid, 'staff' || lpad(n::text, 2, '0'),
       'staff' || lpad(n::text, 2, '0') || '@example.com', :password_hash,
       (ARRAY['Ada', 'Ben', 'Cleo', 'Dev', 'Eva', 'Finn', 'Gia'])[1 + n % 7] || ' Staff ' || n, n <> :users,
       timestamptz '2021-01-01 00:00:00+00', n = 1, timestamptz '2021-01-01 00:00:00+00'
FROM generate_series(1, :users) AS n
"""
# Nearly four years of tasks, one every 10 minutes up to today's midnight (the dashboard's weeks, due dates and
# closings are counted back from now: they must hold what they hold in production). Older tasks are mostly closed;
# 2% deleted; 2.5% unassigned; due from 3 days before to 11 days after their creation.
SEED_TASKS = """
INSERT INTO tasks (id, date_created, entity_name, task_type, task_time, contact_person_id, note, status,
                   created_by_id, updated_at, version, closed_at, closed_by_id, deleted_at)
SELECT lpad(to_hex(i), 32, '0')::uuid, t,
       (ARRAY['Northwind', 'Harbor', 'Summit', 'Bluewater', 'Cedar', 'Granite', 'Evergreen', 'Pinnacle', 'Riverside',
              'Atlas', 'Beacon', 'Crescent', 'Keystone', 'Lighthouse', 'Meridian', 'Oakridge', 'Redwood', 'Silverline',
              'Sterling', 'Trident', 'Vanguard', 'Westbrook', 'Zenith', 'Alder', 'Birchwood', 'Copperfield',
              'Driftwood', 'Eastgate', 'Fairview', 'Goldcrest', 'Highland', 'Ironbridge', 'Juniper', 'Kingsley',
              'Lakeshore', 'Orchard', 'Parkside', 'Rosewood', 'Stonegate', 'Tidewater', 'Aurora', 'Canyon', 'Delta',
              'Falcon', 'Glacier', 'Horizon', 'Kestrel', 'Monarch', 'Olympus', 'Müller'])[1 + (i / 3) % 50]
       || ' ' || (ARRAY['Corporation', 'Holdings', 'LLC', 'Ltd', 'Trust', 'Group', 'Partners', 'Ventures', 'GmbH',
                        'Family Office'])[1 + (i / 7) % 10],
       (ARRAY['Call', 'Call', 'Call', 'Call', 'Call', 'Call', 'Call', 'Call', 'Email', 'Email', 'Email', 'Email',
              'Email', 'Meeting', 'Meeting', 'Meeting', 'Meeting', 'Follow-up', 'Follow-up', 'Site visit'])[1 + i % 20],
       t + (i % 15 - 3) * interval '1 day',
       CASE WHEN i % 40 <> 0 THEN ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i * 3 % 49), 12, '0'))::uuid END,
       CASE WHEN i % 5 < 2 THEN 'Left a voicemail, will try again tomorrow.' END,
       CASE WHEN closed THEN 'closed' ELSE 'open' END,
       ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i * 13 % 49), 12, '0'))::uuid,
       greatest(t, closed_at, deleted_at), 1 + closed::int + (deleted_at IS NOT NULL)::int, closed_at,
       CASE WHEN closed THEN ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i * 17 % 49), 12, '0'))::uuid END,
       deleted_at
FROM generate_series(1, :tasks) AS i,
     LATERAL (SELECT CAST(:today AS timestamptz) - (:tasks + 1 - i) * interval '10 minutes' AS t) AS created,
     LATERAL (SELECT i % 10 < CASE WHEN t < CAST(:today AS timestamptz) - interval '30 days' THEN 8 ELSE 3 END
             AS closed) AS state,
     LATERAL (SELECT CASE WHEN closed THEN least(t + (1 + i % 240) * interval '1 hour', CAST(:today AS timestamptz))
                     END AS closed_at,
                     CASE WHEN i % 50 = 7 THEN least(t + interval '1 day', CAST(:today AS timestamptz)) END
                     AS deleted_at) AS later
"""
# Each task's history as the API would have written it: created, then closed, then deleted, in time order.
SEED_EVENTS = """
INSERT INTO task_events (task_id, occurred_at, actor_id, action, field, old_value, new_value)
SELECT task_id, occurred_at, actor_id, action, field, old_value, new_value FROM (
    SELECT id AS task_id, date_created AS occurred_at, created_by_id AS actor_id, 'created' AS action,
           NULL AS field, NULL::json AS old_value,
           json_build_object('entity_name', entity_name, 'task_type', task_type, 'status', 'open') AS new_value
    FROM tasks
    UNION ALL
    SELECT id, closed_at, closed_by_id, 'status_changed', 'status', '"open"', '"closed"'
    FROM tasks WHERE closed_at IS NOT NULL
    UNION ALL
    SELECT id, deleted_at, created_by_id, 'deleted', NULL, NULL, NULL FROM tasks WHERE deleted_at IS NOT NULL
) AS history
ORDER BY occurred_at, task_id
"""
# The outbox at today's midnight, the outbox steps' now: a message sent a minute for :sent minutes (about 4.6 months;
# a few at the second attempt; their payloads emptied, as mark_sent leaves them); 200 failed over those months; 300
# pending, the newest 250 queued in the last 21 minutes and due, 50 waiting for another attempt (some due); 40 being
# sent, a few of them on their last attempt, and 2 of those abandoned (their lease over). Each was handed to the
# senders as it was queued, so the sweep leaves out the newest 180, handed over less than 15 minutes ago.
SEED_OUTBOX = """
INSERT INTO outbox_messages (id, kind, recipient, event_key, payload, state, attempts, next_attempt_at, last_error,
                             created_at, sent_at, handed_over_at)
SELECT lpad(to_hex(n), 32, '0')::uuid, kind, 'staff' || lpad((1 + n % 49)::text, 2, '0') || '@example.com',
       replace(kind, '_', '-') || ':' || n,
       CASE WHEN state = 'sent' THEN '{}' ELSE '{"link": "https://tasks.example.com/' || kind || '?token=' || n || '"}'
       END::json,
       state, attempts, next_attempt_at, last_error, created_at, sent_at, created_at
FROM (
    SELECT i AS n, 'sent' AS state, 1 + (i % 50 = 0)::int AS attempts, t + interval '2 minutes' AS next_attempt_at,
           NULL AS last_error, t AS created_at, t + (2 + i % 40) * interval '1 second' AS sent_at
    FROM generate_series(1, :sent) AS i,
         LATERAL (SELECT CAST(:today AS timestamptz) - (:sent + 1 - i) * interval '1 minute' AS t) AS created
    UNION ALL
    SELECT :sent + i, 'failed', CASE WHEN i % 3 = 0 THEN 1 ELSE 8 END, t + interval '1 hour',
           CASE WHEN i % 3 = 0 THEN '550 5.1.1 Mailbox unavailable' ELSE 'Connection refused' END, t, NULL
    FROM generate_series(1, 200) AS i, LATERAL (SELECT CAST(:today AS timestamptz) - i * interval '16 hours' AS t) AS c
    UNION ALL
    SELECT :sent + 200 + i, 'pending', CASE WHEN i <= 250 THEN 0 ELSE 1 + i % 7 END,
           CASE WHEN i <= 250 THEN t ELSE CAST(:today AS timestamptz) + (i % 40 - 20) * interval '1 minute' END,
           CASE WHEN i > 250 THEN '421 4.3.2 Service not available' END, t, NULL
    FROM generate_series(1, 300) AS i, LATERAL (SELECT CAST(:today AS timestamptz) - i * interval '5 seconds' AS t) AS c
    UNION ALL
    SELECT :sent + 500 + i, 'sending', CASE WHEN i % 10 = 0 THEN 8 ELSE 1 + i % 3 END,
           CAST(:today AS timestamptz) + (i % 4 * 40 - 30) * interval '1 second', NULL, t, NULL
    FROM generate_series(1, 40) AS i, LATERAL (SELECT CAST(:today AS timestamptz) - i * interval '30 seconds' AS t) AS c
) AS messages,
     LATERAL (SELECT (ARRAY['password_reset', 'password_reset', 'email_verification', 'invitation',
                            'email_change_confirm'])[1 + n % 5] AS kind) AS what
"""
# A link asked for every 4 minutes over the same months, each valid for its purpose's lifetime: 6 in 10 password
# resets, 2 verifications, 1 address change, 1 invitation (from staff01). 7 in 10 were used, 1 revoked, 2 left to
# expire; at today's midnight about 100 are live (invitations and verifications, which last longest). Raw token k is
# 'seed-token-k' (tokens.hash_token).
SEED_LINKS = """
INSERT INTO one_time_tokens (id, purpose, token_hash, email, user_id, created_by_id, data, created_at, expires_at,
                             used_at, revoked_at)
SELECT md5('token' || k)::uuid, purpose, encode(sha256(convert_to('seed-token-' || k, 'UTF8')), 'hex'),
       CASE purpose WHEN 'invitation' THEN 'invitee' || k || '@example.org'
                    WHEN 'email_change' THEN 'staff' || nn || '.new' || k || '@example.org'
                    ELSE 'staff' || nn || '@example.com' END,
       CASE WHEN purpose <> 'invitation' THEN ('00000000-0000-4000-8000-' || lpad(to_hex(1 + k % 49), 12, '0'))::uuid
       END,
       CASE WHEN purpose = 'invitation' THEN '00000000-0000-4000-8000-000000000001'::uuid END,
       CASE WHEN purpose = 'invitation' THEN json_build_object('is_admin', false, 'full_name', 'Invitee ' || k) END,
       t, t + lifetime, CASE WHEN fate < 7 THEN t + least(lifetime / 2, (1 + k % 30) * interval '1 minute') END,
       CASE WHEN fate = 7 THEN t + lifetime / 4 END
FROM generate_series(1, :links) AS k,
     LATERAL (SELECT CAST(:today AS timestamptz) - (:links + 1 - k) * interval '4 minutes' AS t,
                     (ARRAY['password_reset', 'password_reset', 'password_reset', 'password_reset', 'password_reset',
                            'password_reset', 'email_verification', 'email_verification', 'email_change',
                            'invitation'])[1 + k % 10] AS purpose,
                     lpad((1 + k % 49)::text, 2, '0') AS nn, k / 10 % 10 AS fate) AS link,
     LATERAL (SELECT CASE purpose WHEN 'password_reset' THEN interval '1 hour'
                                  WHEN 'email_verification' THEN interval '48 hours'
                                  WHEN 'email_change' THEN interval '24 hours'
                                  ELSE interval '7 days' END AS lifetime) AS valid
"""


def person(n: int) -> str:
    return PERSON.format(n)


@dataclass(frozen=True)
class Endpoint:
    """One request, how many statements it sends, and the indexes its plans must read (each in one plan or more)."""

    statements: int
    method: str
    path: str  # formatted with the ``ids`` fixture
    indexes: tuple[str, ...] = ()
    body: dict | str | None = None  # a str names a body the ``ids`` fixture makes
    problem: str | None = None  # a plan the app gets wrong today: an expected failure (strict) until it is fixed


LOGIN = {"username": "staff02", "password": PASSWORD}
FORGOTTEN = {"email": "staff05@example.com"}
INVITATION = {"email": "new.hire@example.org", "full_name": "Nia Hire"}
NEW_PASSWORD = "lantern-harbor-quietly-42"
NEW_TASK = {"entity_name": "Kestrel Holdings", "task_type": "Call", "task_time": "2030-01-15T10:00:00Z",
            "contact_person_id": person(3)}  # fmt: skip
CHANGES = {"note": "Called back.", "task_type": "Meeting"}

# The one place to change when a change alters what a request sends on purpose (a round trip saved, say): a wrong
# count fails with the statements the request sent and their plans. Each count but those of health, login and the
# requests that ask for or follow a link by email (forgot_password, reset_password, accept_invitation) includes the
# token check (the caller and the token's revocation, in one statement). The list
# sends the token check and the page with its people joined in and its total (from task_counts, or from
# entity_name_counts for the entity name and the status, or a COUNT for other filters) in a scalar subquery.
# fmt: off
ENDPOINTS = {
    "health":                 Endpoint(1, "GET", "/api/health"),
    "login":                  Endpoint(2, "POST", "/api/auth/login", body=LOGIN),  # the locked user, the new session
    "users":                  Endpoint(2, "GET", "/api/users"),
    "list":                   Endpoint(2, "GET", "/api/tasks", ("ix_tasks_date_created_id",)),
    "list_status":            Endpoint(2, "GET", "/api/tasks?status=open", ("ix_tasks_status_date_created_id",)),
    "list_assignee":          Endpoint(2, "GET", f"/api/tasks?contact_person_id={person(7)}",
                                       ("ix_tasks_contact_person_id_date_created_id",)),
    "list_task_type":         Endpoint(2, "GET", "/api/tasks?task_type=meet", ("ix_tasks_date_created_id",)),
    # The partial match's total is summed from entity_name_counts (migration 0006): the page alone reads the tasks,
    # newest first along the default sort's index until it has its rows, instead of every match by the trigram index.
    # (The kept names are scanned here, under 1,000 rows; at a million tasks, 7,363, their trigram index is read.)
    "list_entity_fragment":   Endpoint(2, "GET", f"/api/tasks?entity_name={FRAGMENT}",
                                       ("ix_tasks_date_created_id",)),
    "list_entity_fragment_status": Endpoint(2, "GET", f"/api/tasks?entity_name={FRAGMENT}&status=closed",
                                            ("ix_tasks_date_created_id",)),  # most tasks are closed
    "sort_date_created_asc":  Endpoint(2, "GET", "/api/tasks?sort_order=asc", ("ix_tasks_date_created_id",)),
    "sort_task_time":         Endpoint(2, "GET", "/api/tasks?sort_by=task_time", ("ix_tasks_task_time_id",)),
    "sort_entity_name":       Endpoint(2, "GET", "/api/tasks?sort_by=entity_name&sort_order=asc",
                                       ("ix_tasks_entity_name_sort",)),
    "sort_task_type":         Endpoint(2, "GET", "/api/tasks?sort_by=task_type", ("ix_tasks_task_type_sort",)),
    "sort_status":            Endpoint(2, "GET", "/api/tasks?sort_by=status", ("ix_tasks_status_id",)),
    "sort_updated_at":        Endpoint(2, "GET", "/api/tasks?sort_by=updated_at", ("ix_tasks_updated_at_id",)),
    "cursor_page":            Endpoint(2, "GET", "/api/tasks?cursor={cursor}", ("ix_tasks_date_created_id",)),
    "deep_cursor_page":       Endpoint(2, "GET", "/api/tasks?cursor={deep_cursor}", ("ix_tasks_date_created_id",)),
    # docs/api.md: a deep offset page steps over the rows before it in the index's order, never sorting them.
    "deep_offset_page":       Endpoint(2, "GET", "/api/tasks?page=2500", ("ix_tasks_date_created_id",)),
    "one_task":               Endpoint(2, "GET", "/api/tasks/{open_task}", ("pk_tasks",)),
    # The token check, whether the task is live, the page of events, their total.
    "history":                Endpoint(4, "GET", "/api/tasks/{closed_task}/history", ("ix_task_events_task_id_id",)),
    # The token check, the assignee, the task, its event.
    "create":                 Endpoint(4, "POST", "/api/tasks", body=NEW_TASK),
    # The token check, the lock, the task with its people, its events (one INSERT), the UPDATE.
    "update":                 Endpoint(5, "PUT", "/api/tasks/{updated_task}", ("pk_tasks",), CHANGES),
    "status":                 Endpoint(5, "PATCH", "/api/tasks/{closing_task}/status", ("pk_tasks",),
                                       {"status": "closed"}),
    # The token check, the locks (one SELECT), the UPDATE, the events (one INSERT).
    "bulk_status":            Endpoint(4, "PATCH", "/api/tasks/bulk-status", ("pk_tasks",), "bulk"),
    # Kept figures (migration 0005), and the day's part of an index at each window's edge.
    "dashboard":              Endpoint(2, "GET", "/api/analytics/dashboard",
                                       ("ix_tasks_open_task_time", "ix_tasks_closed_at_date_created",
                                        "pk_task_day_counts", "pk_time_to_close_counts", "pk_times_to_close")),
    "dashboard_status":       Endpoint(2, "GET", "/api/analytics/dashboard?status=open",
                                       ("ix_tasks_open_task_time", "pk_task_day_counts")),
    # Types and assignees from task_counts, entity names from entity_name_counts: no task read.
    "facets":                 Endpoint(2, "GET", "/api/tasks/facets"),
    "facets_status":          Endpoint(2, "GET", "/api/tasks/facets?status=open"),
    "facets_entity_fragment": Endpoint(2, "GET", f"/api/tasks/facets?entity_name={FRAGMENT}",
                                       ("ix_tasks_entity_name_trgm",)),
    # The token check and the first batch (the others are read as the body streams, a statement each).
    "export_first_batch":     Endpoint(2, "GET", "/api/tasks/export.csv", ("ix_tasks_date_created_id",)),
    # Links by email (issue 15). The active account with the address, the link's token, its email queued in the
    # outbox (JOBS_AFTER_COMMIT is off in tests: no sender reads it after the commit).
    "forgot_password":        Endpoint(3, "POST", "/api/auth/forgot-password", body=FORGOTTEN),
    # The link read (by its hash), the account locked, the link used, its new password, its other links revoked, its
    # live sessions locked to be ended (staff04 has none: no blocklist INSERT).
    "reset_password":         Endpoint(6, "POST", "/api/auth/reset-password", ("uq_one_time_tokens_token_hash",),
                                       "reset"),
    # The token check, the address's advisory lock, whether it has an account, its pending invitation revoked (by
    # purpose and address), the new one, its email.
    "invite":                 Endpoint(6, "POST", "/api/invitations", ("ix_one_time_tokens_purpose_email",),
                                       INVITATION),
    # The link read (by its hash), then used, its administrator still one, the new account, its session.
    "accept_invitation":      Endpoint(5, "POST", "/api/auth/accept-invitation", ("uq_one_time_tokens_token_hash",),
                                       "accept"),
}
# fmt: on


@pytest.fixture(scope="module")
def today() -> datetime:
    """Today's midnight (UTC), which the seed counts back from, and the outbox steps' now."""
    return datetime.combine(datetime.now(UTC).date(), time.min, tzinfo=UTC)


@pytest.fixture(scope="module")
def database(today) -> Iterator[str]:
    """A database of the module's own: the seed once per run, and the requests' commits real."""
    with scratch_postgres_database("finstack_plans") as url:
        engine = sa.create_engine(url)
        models = (Task, TaskEvent, OutboxMessage, OneTimeToken)
        indexes = [index for model in models for index in model.__table__.indexes]
        with engine.begin() as connection:
            create_schema(connection)
            # The indexes are built after the rows, as a restore does: a third faster than keeping them up row by row.
            connection.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")
            for index in indexes:
                index.drop(connection)
            password_hash = generate_password_hash(PASSWORD, method=FAST_HASH)
            connection.execute(sa.text(SEED_USERS), {"users": USERS, "password_hash": password_hash})
            connection.execute(sa.text(SEED_TASKS), {"tasks": TASKS, "today": today})
            connection.execute(sa.text(SEED_EVENTS))
            connection.execute(sa.text(SEED_OUTBOX), {"sent": SENT_MESSAGES, "today": today})
            connection.execute(sa.text(SEED_LINKS), {"links": LINKS, "today": today})
            for index in indexes:
                index.create(connection)
            for table in (*HOT_TABLES, *KEPT_TABLES):  # statistics taken once, below: autovacuum's samples would vary
                connection.exec_driver_sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            # What autovacuum would have done by now: statistics, and the visibility map for index-only scans. From
            # every row rather than a random sample of them (300 per unit of the target), so that each run plans alike.
            connection.exec_driver_sql(f"SET default_statistics_target = {STATISTICS_TARGET}")
            connection.exec_driver_sql(f"VACUUM (ANALYZE) {', '.join((*HOT_TABLES, *KEPT_TABLES, 'app_users'))}")
        engine.dispose()
        yield url


@pytest.fixture(scope="module")
def app(database, tmp_path_factory):
    """The app on the module's database, built once, from no environment (as conftest's ``clean_environment``)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in APP_ENVIRONMENT:
            monkeypatch.delenv(name, raising=False)
        app = create_app(settings(database, tmp_path_factory.mktemp("plans")))
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture(scope="module")
def headers(app) -> dict:
    """A token of staff01, an administrator: every write below is one it may make."""
    return {"Authorization": f"Bearer {token_for(app, person(1))}"}


@pytest.fixture(scope="module")
def ids(app, headers) -> dict:
    """The values the ``ENDPOINTS`` paths and bodies name: tasks picked by a fixed rule, cursors as the list gives
    them, a password reset link of staff04's and an invitation of staff01's as the app issues them. The writes change
    a task each, and the bulk update 1,000 others."""
    client = app.test_client()

    def next_cursor(query: str) -> str:
        response = client.get(f"/api/tasks?{query}", headers=headers)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["pagination"]["next_cursor"]

    with app.app_context():
        live_open = db.session.scalars(
            sa.text("SELECT id::text FROM tasks WHERE status = 'open' AND deleted_at IS NULL ORDER BY id LIMIT 1003")
        ).all()
        closed = db.session.scalar(sa.text("SELECT id::text FROM tasks WHERE status = 'closed' ORDER BY id LIMIT 1"))
        now = utcnow()
        _, reset = tokens.issue(
            "password_reset", "staff04@example.com", lifetime=timedelta(hours=1), now=now, user_id=uuid.UUID(person(4))
        )
        _, invitation = tokens.issue(
            "invitation", "joiner@example.org", lifetime=timedelta(days=7), now=now, created_by_id=uuid.UUID(person(1)),
            data={"full_name": "Jo Iner", "is_admin": False},
        )  # fmt: skip
        db.session.commit()
    return {
        "accept": {"token": invitation, "username": "joiner", "password": NEW_PASSWORD},
        "open_task": live_open[0],
        "updated_task": live_open[1],
        "closing_task": live_open[2],
        "closed_task": closed,
        "bulk": {"task_ids": live_open[3:], "status": "closed"},
        "cursor": next_cursor(""),
        "deep_cursor": next_cursor("page=2500"),
        "reset": {"token": reset, "password": NEW_PASSWORD},
    }


@contextmanager
def recorded(app) -> Iterator[list[tuple[str, object]]]:
    """The statements (and their parameters) the app sends meanwhile, transaction control aside."""
    statements = []

    def record(_conn, _cursor, statement, parameters, _context, executemany):
        if not statement.lstrip().upper().startswith(TRANSACTION_CONTROL):
            # insertmanyvalues sends many rows in one statement with one set of parameters, executemany a list of sets
            many = executemany and isinstance(parameters, list | tuple)
            statements.append((statement, parameters[0] if many else parameters))

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def explained(app, statement: str, parameters) -> tuple[str, dict]:
    """The statement as sent (parameters in) and its plan, in a transaction rolled back. EXPLAIN without ANALYZE
    plans a write but never runs it."""
    with app.app_context():
        connection = db.engine.raw_connection()
    try:
        with connection.cursor() as cursor:
            sent = cursor.mogrify(statement, parameters).decode()
            cursor.execute("EXPLAIN (FORMAT JSON) " + sent)
            plan = cursor.fetchone()[0][0]["Plan"]
        connection.rollback()
    finally:
        connection.close()
    return sent, plan


def nodes(plan: dict, ancestors: tuple = ()) -> Iterator[tuple[dict, tuple]]:
    """Every node of a plan with its ancestors, nearest last. Init plans, subplans and CTEs are children in "Plans"
    too (their "Parent Relationship" says which)."""
    yield plan, ancestors
    for child in plan.get("Plans", []):
        yield from nodes(child, (*ancestors, plan))


def reads_hot_table(plan: dict) -> bool:
    return any(node.get("Relation Name") in HOT_TABLES for node, _ in nodes(plan))


def describe(node: dict) -> str:
    on = f" on {node['Relation Name']}" if "Relation Name" in node else ""
    using = f" using {node['Index Name']}" if "Index Name" in node else ""
    parallel = "Parallel " if node.get("Parallel Aware") else ""
    return f"{parallel}{node['Node Type']}{on}{using} (about {node['Plan Rows']:,} rows)"


def kept_rows(sent: str) -> int:
    """The most rows a LIMIT of the statement keeps, its OFFSET included (0 without a LIMIT)."""
    limits = re.findall(r"\bLIMIT (\d+)(?: OFFSET (\d+))?", sent)
    return max((int(limit) + int(offset or 0) for limit, offset in limits), default=0)


def plan_problems(sent: str, plan: dict) -> list[str]:
    """What in the plan reads a hot table (``tasks``, ``task_events``, ``outbox_messages``, ``one_time_tokens``) the
    slow way.

    - A sequential scan of one: it reads every row, and its cost grows with the table however small the answer.
    - A Sort of rows read from one, unless it is a top-N sort under a Limit of at most ``TOP_N`` rows (OFFSET
      included): that one keeps only the page in memory while the rows go by, which a page of a substring match
      needs (the rows come from the trigram index, and the exact total reads them anyway). Any other sort sorts
      everything it is given (all of the filtered rows, or every row before a deep OFFSET), spills to disk as the
      table grows, and is what a missing or unusable index looks like. EXPLAIN without ANALYZE does not say which
      sort method runs, so the Limit is read from the statement itself (a Gather Merge between the two is the same
      top-N sort, split between workers). An Incremental Sort, which finishes the order of rows an index already
      gives sorted by their leading keys, is allowed.

    Aggregates that order their input themselves (the dashboard's median, percentile_disc ... WITHIN GROUP) are no
    Sort node: they are bounded by the index range that feeds them, which ``indexes`` names."""
    problems = []
    for node, ancestors in nodes(plan):
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in HOT_TABLES:
            problems.append(describe(node))
        elif node["Node Type"] == "Sort" and reads_hot_table(node):
            above = [ancestor["Node Type"] for ancestor in ancestors if ancestor["Node Type"] != "Gather Merge"]
            if not (above and above[-1] == "Limit" and 0 < kept_rows(sent) <= TOP_N):
                keys = ", ".join(node.get("Sort Key", []))
                parent = above[-1] if above else "nothing"
                problems.append(f"{describe(node)} by {keys}, under {parent}, keeping {kept_rows(sent) or 'all'} rows")
    return problems


def indexes_read(plan: dict) -> set[str]:
    return {node["Index Name"] for node, _ in nodes(plan) if "Index Name" in node}


def shortened(sent: str) -> str:
    """A statement for a failure message: runs of plain columns left out, at most 1,500 characters."""
    return re.sub(r"(?:\b\w+\.\w+(?: AS \w+)?, ){4,}", "..., ", sent)[:1500]


def plan_text(plan: dict) -> str:
    return "\n".join("  " * len(ancestors) + describe(node) for node, ancestors in nodes(plan))


def endpoint_param(name: str, endpoint: Endpoint):
    marks = [pytest.mark.xfail(strict=True, reason=endpoint.problem)] if endpoint.problem else []
    return pytest.param(name, endpoint, id=name, marks=marks)


def assert_index_plans(app, name: str, statements: list, count: int, indexes: tuple[str, ...]) -> None:
    """The recorded ``statements`` are ``count``, none has a plan problem, and together they read ``indexes``."""
    plans = [explained(app, statement, parameters) for statement, parameters in statements]
    listing = "\n".join(f"{n}. {shortened(sent)}\n{plan_text(plan)}" for n, (sent, plan) in enumerate(plans, 1))
    assert len(statements) == count, f"{name} sent {len(statements)} statements, not {count}:\n{listing}"
    problems = [f"{problem} in:\n{shortened(sent)}" for sent, plan in plans for problem in plan_problems(sent, plan)]
    assert not problems, f"{name}: " + "\n".join(problems) + f"\n\nEvery statement:\n{listing}"
    read = set().union(*(indexes_read(plan) for _sent, plan in plans))
    missing = [index for index in indexes if index not in read]
    assert not missing, f"{name} does not read {missing}:\n{listing}"


@pytest.mark.parametrize(("name", "endpoint"), [endpoint_param(name, endpoint) for name, endpoint in ENDPOINTS.items()])
def test_hot_endpoint_sends_its_statements_with_index_plans(app, headers, ids, name, endpoint):
    body = ids[endpoint.body] if isinstance(endpoint.body, str) else endpoint.body
    client = app.test_client()

    with recorded(app) as statements:
        # The export's first batch is read before its answer starts; reading the body would fetch the rest.
        response = client.open(endpoint.path.format(**ids), method=endpoint.method, headers=headers, json=body)

    assert response.status_code in (200, 201, 202), response.get_data()[:500]
    response.close()
    assert_index_plans(app, name, statements, endpoint.statements, endpoint.indexes)


@dataclass(frozen=True)
class OutboxStep:
    """A step of the outbox's delivery, called with the seed's now and the oldest message due then (claimed first,
    unrecorded, for a step that marks it, as its sender would have): how many statements it sends, and the indexes
    its plans must read."""

    statements: int
    call: Callable[[datetime, OutboxMessage], object]
    indexes: tuple[str, ...] = ()
    claimed: bool = False


def metrics(now: datetime, _message: OutboxMessage) -> dict:
    """The figures as /metrics reads them: on a connection of its own (routes/metrics.py)."""
    with db.engine.connect() as connection:
        return outbox.figures(now, connection)


REFUSED = "421 4.3.2 Service not available"
# fmt: off
OUTBOX_STEPS = {
    # The sweep: the oldest due messages' ids (the partial index's rows, in its order), then the next batch after the
    # last one's.
    "due":            OutboxStep(1, lambda now, _message: outbox.due(now), ("ix_outbox_messages_due",)),
    "due_next_batch": OutboxStep(1, lambda now, message: outbox.due(now, after=message),
                                 ("ix_outbox_messages_due",)),
    # The few messages being sent, by either index that has them: the due one, or the one by state.
    "park_abandoned": OutboxStep(1, lambda now, _message: outbox.park_abandoned(now)),
    # A sender: the message claimed by its id, then marked (outbox.finish) when its email went out, or failed for now.
    "claim":          OutboxStep(1, lambda now, message: outbox.claim(message.id, now), ("pk_outbox_messages",)),
    "mark_sent":      OutboxStep(1, lambda now, message: outbox.mark_sent(message, now), ("pk_outbox_messages",),
                                 claimed=True),
    # Its id or the end of its lease (the due index, as it is still sending) finds the one row: either index will do.
    "mark_failed":    OutboxStep(1, lambda now, message: outbox.mark_failed(message, REFUSED, now), claimed=True),
    # /metrics: the unsent by state, the retrying, the oldest unsent (these by state and created_at), the deliveries
    # of the last 5 minutes (by sent_at).
    "figures":        OutboxStep(4, metrics, ("ix_outbox_messages_state_created_at", "ix_outbox_messages_sent_at")),
}
# fmt: on


@pytest.mark.parametrize("name", OUTBOX_STEPS)
def test_outbox_step_sends_its_statements_with_index_plans(app, today, name):
    """Each step in a transaction rolled back, so that every step finds the outbox as seeded."""
    step = OUTBOX_STEPS[name]
    with app.app_context():
        message_id = outbox.due(today, limit=1)[0].id
        message = outbox.claim(message_id, today) if step.claimed else db.session.get(OutboxMessage, message_id)
        with recorded(app) as statements:
            step.call(today, message)
        db.session.rollback()

    assert_index_plans(app, name, statements, step.statements, step.indexes)


READS = [name for name, endpoint in ENDPOINTS.items() if endpoint.method == "GET" and endpoint.statements > 1]


@pytest.mark.parametrize("name", READS)
def test_a_read_sends_no_begin_and_no_rollback(app, headers, ids, name):
    """GET requests run in autocommit (config.reads_without_transactions). psycopg2 sends BEGIN just before a
    transaction's first statement, so a second statement finding the connection outside a transaction means none
    was begun, and none is ended. A write still gets its transaction."""
    in_transaction = []

    def note(connection, *_args):
        in_transaction.append(connection.connection.dbapi_connection.status != STATUS_READY)

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        client = app.test_client()
        read = client.get(ENDPOINTS[name].path.format(**ids), headers=headers)
        assert read.status_code == 200
        read.close()
        reads, in_transaction[:] = list(in_transaction), []
        write = client.patch(f"/api/tasks/{ids['closing_task']}/status", json={"status": "open"}, headers=headers)
        assert write.status_code == 200
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)

    assert reads and not any(reads), reads
    assert in_transaction[1:] and all(in_transaction[1:]), in_transaction  # BEGIN goes with the first
