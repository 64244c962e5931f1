"""Live tasks per (entity name, status) kept by the writes: the partial entity-name filter's total and the facets'
entity names without counting the tasks.

A new table, entity_name_counts, kept exact by triggers on tasks in the transaction of every write, as task_counts is
(one statement trigger with transition tables on PostgreSQL, upserting in key order; row triggers on SQLite), with a
trigram index on PostgreSQL for the substring filter. The upgrade fills it from the tasks already there in one grouped
INSERT, in key order (1.2 s at a million tasks); the downgrade drops it.

The SQL of the triggers is copied here on purpose, as in 0003 to 0005: a migration is history, and must not change
when models.py does. tests/test_task_counts.py checks that a migrated database has the triggers models.py creates.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TRIGGER_NAMES = (
    "entity_name_counts_insert",
    "entity_name_counts_update",
    "entity_name_counts_delete",
    "entity_name_counts_truncate",
)

POSTGRESQL_TRIGGERS = (
    """CREATE OR REPLACE FUNCTION entity_name_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO entity_name_counts AS counts (entity_name, status, n)
        SELECT entity_name, status, count(*) FROM new_rows WHERE deleted_at IS NULL
        GROUP BY entity_name, status ORDER BY entity_name, status
        ON CONFLICT (entity_name, status) DO UPDATE SET n = counts.n + excluded.n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO entity_name_counts AS counts (entity_name, status, n)
        SELECT entity_name, status, -count(*) FROM old_rows WHERE deleted_at IS NULL
        GROUP BY entity_name, status ORDER BY entity_name, status
        ON CONFLICT (entity_name, status) DO UPDATE SET n = counts.n + excluded.n;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO entity_name_counts AS counts (entity_name, status, n)
        SELECT entity_name, status, sum(delta) FROM (
            SELECT entity_name, status, 1 AS delta FROM new_rows WHERE deleted_at IS NULL
            UNION ALL
            SELECT entity_name, status, -1 FROM old_rows WHERE deleted_at IS NULL
        ) AS changes
        GROUP BY entity_name, status HAVING sum(delta) <> 0 ORDER BY entity_name, status
        ON CONFLICT (entity_name, status) DO UPDATE SET n = counts.n + excluded.n;
    ELSE
        TRUNCATE entity_name_counts;  -- TRUNCATE tasks
    END IF;
    RETURN NULL;
END
$$""",
    """CREATE TRIGGER entity_name_counts_insert AFTER INSERT ON tasks REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION entity_name_counts_apply()""",
    """CREATE TRIGGER entity_name_counts_update AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION entity_name_counts_apply()""",
    """CREATE TRIGGER entity_name_counts_delete AFTER DELETE ON tasks REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION entity_name_counts_apply()""",
    """CREATE TRIGGER entity_name_counts_truncate AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION entity_name_counts_apply()""",
)


def sqlite_apply(row: str, delta: str) -> str:
    return f"""
    INSERT INTO entity_name_counts (entity_name, status, n)
    SELECT {row}.entity_name, {row}.status, {delta} WHERE {row}.deleted_at IS NULL
    ON CONFLICT (entity_name, status) DO UPDATE SET n = n + excluded.n;"""


SQLITE_TRIGGERS = (
    f"CREATE TRIGGER entity_name_counts_insert AFTER INSERT ON tasks BEGIN{sqlite_apply('NEW', '1')}\nEND",
    f"""CREATE TRIGGER entity_name_counts_update AFTER UPDATE OF entity_name, status, deleted_at ON tasks
    WHEN OLD.entity_name IS NOT NEW.entity_name OR OLD.status IS NOT NEW.status
        OR (OLD.deleted_at IS NULL) IS NOT (NEW.deleted_at IS NULL)
    BEGIN{sqlite_apply("OLD", "-1")}{sqlite_apply("NEW", "1")}\nEND""",
    f"CREATE TRIGGER entity_name_counts_delete AFTER DELETE ON tasks BEGIN{sqlite_apply('OLD', '-1')}\nEND",
)

BACKFILL = """INSERT INTO entity_name_counts (entity_name, status, n)
    SELECT entity_name, status, count(*) FROM tasks WHERE deleted_at IS NULL
    GROUP BY entity_name, status ORDER BY entity_name, status"""


def upgrade():
    dialect = op.get_bind().dialect.name
    op.create_table(
        "entity_name_counts",
        sa.Column("entity_name", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("entity_name", "status", name=op.f("pk_entity_name_counts")),
    )
    # Triggers first: on PostgreSQL creating them locks out writers until this migration commits, so no task
    # written meanwhile is missed or counted twice by the backfill below.
    for statement in POSTGRESQL_TRIGGERS if dialect == "postgresql" else SQLITE_TRIGGERS:
        op.execute(statement)
    op.execute(BACKFILL)
    if dialect == "postgresql":
        # The substring filter's trigram index (models.py creates it on PostgreSQL only), built after the rows.
        op.execute(
            "CREATE INDEX ix_entity_name_counts_entity_name_trgm ON entity_name_counts USING gin "
            "(entity_name gin_trgm_ops)"
        )
        op.execute("ANALYZE entity_name_counts")  # plans from the first request


def downgrade():
    postgresql = op.get_bind().dialect.name == "postgresql"
    for name in TRIGGER_NAMES if postgresql else TRIGGER_NAMES[:3]:
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + (" ON tasks" if postgresql else ""))
    if postgresql:
        op.execute("DROP FUNCTION IF EXISTS entity_name_counts_apply()")
    op.drop_table("entity_name_counts")
