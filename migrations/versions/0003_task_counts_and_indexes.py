"""Fast at a million tasks: an index per sort and filter, trigram indexes, and task counts kept by triggers.

The old single-column indexes give way to composite ones that end in id, like every ORDER BY of the list. On
PostgreSQL, case-insensitive sorts get expression indexes and substring filters pg_trgm GIN indexes. The
task_counts table holds the number of tasks per (status, task type, assignee), kept exact by triggers in the
same transaction as every write, so totals and the dashboard need no scan of tasks.

The SQL of the triggers is copied here on purpose: a migration is history, and must not change when models.py
does. tests/test_task_counts.py checks that a migrated database has the same triggers as models.py creates.

The indexes are built inside the migration's transaction, not CONCURRENTLY: on a large existing table, writes to
tasks wait until it commits.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

OLD_INDEXES = ("date_created", "entity_name", "task_type", "task_time", "contact_person_id", "status", "updated_at")
INDEXES = {
    "ix_tasks_date_created_id": ["date_created", "id"],
    "ix_tasks_task_time_id": ["task_time", "id"],
    "ix_tasks_updated_at_id": ["updated_at", "id"],
    "ix_tasks_status_id": ["status", "id"],
    "ix_tasks_status_date_created_id": ["status", "date_created", "id"],
    "ix_tasks_contact_person_id_date_created_id": ["contact_person_id", "date_created", "id"],
}
POSTGRESQL_INDEXES = (
    "CREATE INDEX ix_tasks_entity_name_sort ON tasks (lower(entity_name), entity_name, id)",
    "CREATE INDEX ix_tasks_task_type_sort ON tasks (lower(task_type), task_type, id)",
    "CREATE INDEX ix_tasks_entity_name_trgm ON tasks USING gin (entity_name gin_trgm_ops)",
    "CREATE INDEX ix_tasks_task_type_trgm ON tasks USING gin (task_type gin_trgm_ops)",
)

POSTGRESQL_TRIGGERS = (
    """CREATE OR REPLACE FUNCTION task_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO task_counts AS counts (status, task_type, contact_person_id, n)
        SELECT status, task_type, contact_person_id, count(*) FROM new_rows
        GROUP BY status, task_type, contact_person_id ORDER BY status, task_type, contact_person_id
        ON CONFLICT (status, task_type, contact_person_id) DO UPDATE SET n = counts.n + excluded.n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO task_counts AS counts (status, task_type, contact_person_id, n)
        SELECT status, task_type, contact_person_id, -count(*) FROM old_rows
        GROUP BY status, task_type, contact_person_id ORDER BY status, task_type, contact_person_id
        ON CONFLICT (status, task_type, contact_person_id) DO UPDATE SET n = counts.n + excluded.n;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Only rows whose status, type or assignee changed move between counters; a note edit writes nothing.
        INSERT INTO task_counts AS counts (status, task_type, contact_person_id, n)
        SELECT status, task_type, contact_person_id, sum(delta) FROM (
            SELECT status, task_type, contact_person_id, 1 AS delta FROM new_rows
            UNION ALL
            SELECT status, task_type, contact_person_id, -1 FROM old_rows
        ) AS changes
        GROUP BY status, task_type, contact_person_id HAVING sum(delta) <> 0
        ORDER BY status, task_type, contact_person_id
        ON CONFLICT (status, task_type, contact_person_id) DO UPDATE SET n = counts.n + excluded.n;
    ELSE
        DELETE FROM task_counts;  -- TRUNCATE tasks
    END IF;
    RETURN NULL;
END
$$""",
    """CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply()""",
    """CREATE TRIGGER task_counts_update AFTER UPDATE ON tasks REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply()""",
    """CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply()""",
    """CREATE TRIGGER task_counts_truncate AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply()""",
)

_SQLITE_ADD = """
    INSERT INTO task_counts (status, task_type, contact_person_id, n)
    SELECT NEW.status, NEW.task_type, NEW.contact_person_id, 0 WHERE NOT EXISTS (
        SELECT 1 FROM task_counts
        WHERE status = NEW.status AND task_type = NEW.task_type AND contact_person_id IS NEW.contact_person_id
    );
    UPDATE task_counts SET n = n + 1
    WHERE status = NEW.status AND task_type = NEW.task_type AND contact_person_id IS NEW.contact_person_id;"""
_SQLITE_REMOVE = """
    UPDATE task_counts SET n = n - 1
    WHERE status = OLD.status AND task_type = OLD.task_type AND contact_person_id IS OLD.contact_person_id;"""
SQLITE_TRIGGERS = (
    f"CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks BEGIN{_SQLITE_ADD}\nEND",
    f"""CREATE TRIGGER task_counts_update AFTER UPDATE OF status, task_type, contact_person_id ON tasks
    WHEN OLD.status IS NOT NEW.status OR OLD.task_type IS NOT NEW.task_type
        OR OLD.contact_person_id IS NOT NEW.contact_person_id
    BEGIN{_SQLITE_REMOVE}{_SQLITE_ADD}\nEND""",
    f"CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks BEGIN{_SQLITE_REMOVE}\nEND",
)
TRIGGER_NAMES = ("task_counts_insert", "task_counts_update", "task_counts_delete", "task_counts_truncate")


def upgrade():
    postgresql = op.get_bind().dialect.name == "postgresql"
    for column in OLD_INDEXES:
        op.drop_index(op.f(f"ix_tasks_{column}"), table_name="tasks")
    for name, columns in INDEXES.items():
        op.create_index(name, "tasks", columns)
    if postgresql:
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        for statement in POSTGRESQL_INDEXES:
            op.execute(statement)

    op.create_table(
        "task_counts",
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("task_type", sa.String(length=50), nullable=False),
        sa.Column("contact_person_id", sa.Uuid(), nullable=True),
        sa.Column("n", sa.Integer(), nullable=False),
    )
    op.create_index(
        "uq_task_counts_key",
        "task_counts",
        ["status", "task_type", "contact_person_id"],
        unique=True,
        postgresql_nulls_not_distinct=True,
    )
    # Triggers first: on PostgreSQL creating them locks out writers until this migration commits, so no task
    # written meanwhile is missed or counted twice by the count below.
    for statement in POSTGRESQL_TRIGGERS if postgresql else SQLITE_TRIGGERS:
        op.execute(statement)
    op.execute(
        "INSERT INTO task_counts (status, task_type, contact_person_id, n) "
        "SELECT status, task_type, contact_person_id, count(*) FROM tasks GROUP BY status, task_type, contact_person_id"
    )


def downgrade():
    postgresql = op.get_bind().dialect.name == "postgresql"
    for name in TRIGGER_NAMES if postgresql else TRIGGER_NAMES[:3]:
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + (" ON tasks" if postgresql else ""))
    if postgresql:
        op.execute("DROP FUNCTION IF EXISTS task_counts_apply()")
    op.drop_index("uq_task_counts_key", table_name="task_counts")
    op.drop_table("task_counts")
    if postgresql:
        for name in (
            "ix_tasks_entity_name_sort",
            "ix_tasks_task_type_sort",
            "ix_tasks_entity_name_trgm",
            "ix_tasks_task_type_trgm",
        ):
            op.drop_index(name, table_name="tasks")
    for name in INDEXES:
        op.drop_index(name, table_name="tasks")
    for column in OLD_INDEXES:
        op.create_index(op.f(f"ix_tasks_{column}"), "tasks", [column])
