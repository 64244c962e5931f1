"""The dashboard's statement on PostgreSQL: what it reads, from EXPLAIN ANALYZE (collected in the PostgreSQL run only,
like test_query_plans.py: conftest.py)."""

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from models import db

# One task an hour from 60 days before to 60 days after now, created and due at that hour; those at an even hour
# more than two hours before now were closed 90 minutes later.
HOURLY_TASKS = """
INSERT INTO tasks (id, date_created, entity_name, task_type, task_time, status, updated_at, closed_at)
SELECT gen_random_uuid(), t, 'ABC Corporation', 'Call', t, CASE WHEN closed THEN 'closed' ELSE 'open' END, t,
       CASE WHEN closed THEN t + interval '90 minutes' END
FROM generate_series(CAST(:now AS timestamptz) - interval '60 days', CAST(:now AS timestamptz) + interval '60 days',
                     interval '1 hour') AS t,
     LATERAL (SELECT t < CAST(:now AS timestamptz) - interval '2 hours' AND extract(hour FROM t)::int % 2 = 0
              AS closed) AS state
"""


def plan_nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


@pytest.mark.parametrize("query", ["", "?status=open", "?status=closed"])
def test_dashboard_reads_the_tasks_of_no_more_than_the_edges_of_days(app, client, auth_headers, frozen_now, query):
    """Every figure is kept by the writes: of 2,881 tasks in the periods, the statement reads only those in the
    parts of days at the edges of its windows (a day holds 24): not the weeks, 30 days and due dates it counts."""
    now = frozen_now(datetime(2026, 3, 4, 12, 30, tzinfo=UTC))
    with app.app_context():
        db.session.execute(sa.text(HOURLY_TASKS), {"now": now})
        db.session.commit()
        db.session.execute(sa.text("ANALYZE tasks"))
    sent = []

    def record(_conn, _cursor, statement, parameters, *_args):
        if "task_day_counts" in statement:
            sent.append((statement, parameters))

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        response = client.get(f"/api/analytics/dashboard{query}", headers=auth_headers)
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)

    assert response.status_code == 200
    assert response.get_json()["summary"]["total_tasks"] > (0 if query else 2_880)
    ((statement, parameters),) = sent
    with app.app_context():
        cursor = db.session.connection().connection.cursor()
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
        plan = cursor.fetchone()[0][0]["Plan"]
    read = sum(
        (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
        for node in plan_nodes(plan)
        if node.get("Relation Name") == "tasks"
    )
    assert 0 < read <= 4 * 24
