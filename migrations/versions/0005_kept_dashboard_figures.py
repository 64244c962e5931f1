"""The dashboard's time-based figures kept by the writes: tasks per UTC day, and the times to close.

New tables, kept exact by triggers on tasks in the transaction of every write, as task_counts is (one statement
trigger with transition tables on PostgreSQL, row triggers on SQLite): task_day_counts (live tasks created per day and
status, open ones due per day, closed ones closed per day), time_to_close_counts (closings per closing day and bucket
of their time to close) and times_to_close (each time to close, in microseconds, per bucket and closing day, with how
many closings took exactly that long). The upgrade fills them from the tasks already there, in one grouped INSERT
each, in key order (so that each day's rows start out together on disk); the downgrade drops them.

The SQL of the triggers is copied here on purpose, as in 0003 and 0004: a migration is history, and must not change
when models.py does. tests/test_task_counts.py checks that a migrated database has the triggers models.py creates.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("task_day_counts", "time_to_close_counts", "times_to_close")
TRIGGER_NAMES = ("task_figures_insert", "task_figures_update", "task_figures_delete", "task_figures_truncate")


def bucket_sql(microseconds: str) -> str:
    digits = f"CAST(abs({microseconds}) AS TEXT)"
    sign = f"CASE WHEN {microseconds} < 0 THEN -1 ELSE 1 END"
    return f"({sign}) * (20 * length({digits}) + CAST(substr({digits}, 1, 2) AS INTEGER) / 5)"


def microseconds_sql(dialect: str, closed_at: str, date_created: str) -> str:
    if dialect == "postgresql":
        return f"CAST(extract(epoch FROM {closed_at} - {date_created}) * 1000000 AS BIGINT)"

    def whole(column: str) -> str:
        return f"CAST(strftime('%s', substr({column}, 1, 19)) AS INTEGER)"

    def fraction(column: str) -> str:
        return f"CAST(substr({column}, 20) AS REAL)"

    return (
        f"(({whole(closed_at)} - {whole(date_created)}) * 1000000"
        f" + CAST(round(({fraction(closed_at)} - {fraction(date_created)}) * 1000000) AS INTEGER))"
    )


POSTGRESQL_CHANGES = {
    "INSERT": "SELECT status, date_created, task_time, closed_at, 1 AS delta FROM new_rows WHERE deleted_at IS NULL",
    "DELETE": "SELECT status, date_created, task_time, closed_at, -1 AS delta FROM old_rows WHERE deleted_at IS NULL",
    "UPDATE": """SELECT status, date_created, task_time, closed_at, 1 AS delta FROM new_rows WHERE deleted_at IS NULL
            UNION ALL
            SELECT status, date_created, task_time, closed_at, -1 FROM old_rows WHERE deleted_at IS NULL""",
}
POSTGRESQL_CLOSINGS = f"""SELECT day, {bucket_sql("microseconds")} AS bucket, microseconds, delta FROM (
            SELECT (closed_at AT TIME ZONE 'UTC')::date AS day,
                {microseconds_sql("postgresql", "closed_at", "date_created")} AS microseconds, delta
            FROM changes WHERE closed_at IS NOT NULL
        ) AS spans"""
POSTGRESQL_UPSERTS = (
    """INSERT INTO task_day_counts AS counts (kind, day, status, n)
        SELECT kind, day, status, sum(delta) FROM (
            SELECT 'created' AS kind, status, (date_created AT TIME ZONE 'UTC')::date AS day, delta FROM changes
            UNION ALL
            SELECT 'due', status, (task_time AT TIME ZONE 'UTC')::date, delta FROM changes WHERE status = 'open'
            UNION ALL
            SELECT 'closed', status, (closed_at AT TIME ZONE 'UTC')::date, delta
            FROM changes WHERE closed_at IS NOT NULL
        ) AS days
        GROUP BY kind, day, status HAVING sum(delta) <> 0 ORDER BY kind, day, status
        ON CONFLICT (kind, day, status) DO UPDATE SET n = counts.n + excluded.n""",
    """INSERT INTO time_to_close_counts AS counts (day, bucket, n)
        SELECT day, bucket, sum(delta) FROM closings
        GROUP BY day, bucket HAVING sum(delta) <> 0 ORDER BY day, bucket
        ON CONFLICT (day, bucket) DO UPDATE SET n = counts.n + excluded.n""",
    """INSERT INTO times_to_close AS counts (bucket, day, microseconds, n)
        SELECT bucket, day, microseconds, sum(delta) FROM closings
        GROUP BY bucket, day, microseconds HAVING sum(delta) <> 0 ORDER BY bucket, day, microseconds
        ON CONFLICT (bucket, day, microseconds) DO UPDATE SET n = counts.n + excluded.n""",
)


def postgresql_branch(operation: str) -> str:
    changes = POSTGRESQL_CHANGES[operation]
    return "".join(
        f"""
        WITH changes AS (
            {changes}
        ), closings AS (
        {POSTGRESQL_CLOSINGS}
        )
        {upsert};"""
        for upsert in POSTGRESQL_UPSERTS
    )


POSTGRESQL_TRIGGERS = (
    f"""CREATE OR REPLACE FUNCTION task_figures_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN{postgresql_branch("INSERT")}
    ELSIF TG_OP = 'DELETE' THEN{postgresql_branch("DELETE")}
    ELSIF TG_OP = 'UPDATE' THEN{postgresql_branch("UPDATE")}
    ELSE
        TRUNCATE task_day_counts, time_to_close_counts, times_to_close;  -- TRUNCATE tasks
    END IF;
    RETURN NULL;
END
$$""",
    """CREATE TRIGGER task_figures_insert AFTER INSERT ON tasks REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_figures_apply()""",
    """CREATE TRIGGER task_figures_update AFTER UPDATE ON tasks REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_figures_apply()""",
    """CREATE TRIGGER task_figures_delete AFTER DELETE ON tasks REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_figures_apply()""",
    """CREATE TRIGGER task_figures_truncate AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION task_figures_apply()""",
)


def sqlite_apply(row: str, delta: str) -> str:
    live = f"{row}.deleted_at IS NULL"
    spans = (
        f"(SELECT substr({row}.closed_at, 1, 10) AS day, "
        f"{microseconds_sql('sqlite', f'{row}.closed_at', f'{row}.date_created')} AS microseconds)"
    )
    bucket = bucket_sql("microseconds")
    return f"""
    INSERT INTO task_day_counts (kind, status, day, n)
    SELECT 'created', {row}.status, substr({row}.date_created, 1, 10), {delta} WHERE {live}
    UNION ALL
    SELECT 'due', {row}.status, substr({row}.task_time, 1, 10), {delta} WHERE {live} AND {row}.status = 'open'
    UNION ALL
    SELECT 'closed', {row}.status, substr({row}.closed_at, 1, 10), {delta} WHERE {live} AND {row}.closed_at IS NOT NULL
    ON CONFLICT (kind, day, status) DO UPDATE SET n = n + excluded.n;
    INSERT INTO time_to_close_counts (day, bucket, n)
    SELECT day, {bucket}, {delta} FROM {spans} WHERE {live} AND {row}.closed_at IS NOT NULL
    ON CONFLICT (day, bucket) DO UPDATE SET n = n + excluded.n;
    INSERT INTO times_to_close (bucket, day, microseconds, n)
    SELECT {bucket}, day, microseconds, {delta} FROM {spans} WHERE {live} AND {row}.closed_at IS NOT NULL
    ON CONFLICT (bucket, day, microseconds) DO UPDATE SET n = n + excluded.n;"""


SQLITE_TRIGGERS = (
    f"CREATE TRIGGER task_figures_insert AFTER INSERT ON tasks BEGIN{sqlite_apply('NEW', '1')}\nEND",
    f"""CREATE TRIGGER task_figures_update AFTER UPDATE OF date_created, task_time, status, closed_at, deleted_at
    ON tasks
    WHEN OLD.date_created IS NOT NEW.date_created OR OLD.task_time IS NOT NEW.task_time
        OR OLD.status IS NOT NEW.status OR OLD.closed_at IS NOT NEW.closed_at
        OR (OLD.deleted_at IS NULL) IS NOT (NEW.deleted_at IS NULL)
    BEGIN{sqlite_apply("OLD", "-1")}{sqlite_apply("NEW", "1")}\nEND""",
    f"CREATE TRIGGER task_figures_delete AFTER DELETE ON tasks BEGIN{sqlite_apply('OLD', '-1')}\nEND",
)


def backfill(dialect: str) -> tuple[str, ...]:
    """The kept rows of the live tasks already there, one grouped INSERT per table, in key order."""

    def day(column: str) -> str:
        return f"({column} AT TIME ZONE 'UTC')::date" if dialect == "postgresql" else f"substr({column}, 1, 10)"

    closings = f"""SELECT day, {bucket_sql("microseconds")} AS bucket, microseconds FROM (
        SELECT {day("closed_at")} AS day, {microseconds_sql(dialect, "closed_at", "date_created")} AS microseconds
        FROM tasks WHERE deleted_at IS NULL AND closed_at IS NOT NULL
    ) AS spans"""
    return (
        f"""INSERT INTO task_day_counts (kind, status, day, n)
        SELECT kind, status, day, count(*) FROM (
            SELECT 'created' AS kind, status, {day("date_created")} AS day FROM tasks WHERE deleted_at IS NULL
            UNION ALL
            SELECT 'due', status, {day("task_time")} FROM tasks WHERE deleted_at IS NULL AND status = 'open'
            UNION ALL
            SELECT 'closed', status, {day("closed_at")} FROM tasks WHERE deleted_at IS NULL AND closed_at IS NOT NULL
        ) AS days
        GROUP BY kind, day, status ORDER BY kind, day, status""",
        f"""INSERT INTO time_to_close_counts (day, bucket, n)
        SELECT day, bucket, count(*) FROM ({closings}) AS closings GROUP BY day, bucket ORDER BY day, bucket""",
        f"""INSERT INTO times_to_close (bucket, day, microseconds, n)
        SELECT bucket, day, microseconds, count(*) FROM ({closings}) AS closings
        GROUP BY bucket, day, microseconds ORDER BY bucket, day, microseconds""",
    )


def upgrade():
    dialect = op.get_bind().dialect.name
    op.create_table(
        "task_day_counts",
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "day", "status", name=op.f("pk_task_day_counts")),
    )
    op.create_table(
        "time_to_close_counts",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("day", "bucket", name=op.f("pk_time_to_close_counts")),
    )
    op.create_table(
        "times_to_close",
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("microseconds", sa.BigInteger(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("bucket", "day", "microseconds", name=op.f("pk_times_to_close")),
    )
    # Triggers first: on PostgreSQL creating them locks out writers until this migration commits, so no task
    # written meanwhile is missed or counted twice by the backfill below.
    for statement in POSTGRESQL_TRIGGERS if dialect == "postgresql" else SQLITE_TRIGGERS:
        op.execute(statement)
    for statement in backfill(dialect):
        op.execute(statement)
    if dialect == "postgresql":
        op.execute("ANALYZE task_day_counts, time_to_close_counts, times_to_close")  # plans from the first request


def downgrade():
    postgresql = op.get_bind().dialect.name == "postgresql"
    for name in TRIGGER_NAMES if postgresql else TRIGGER_NAMES[:3]:
        op.execute(f"DROP TRIGGER IF EXISTS {name}" + (" ON tasks" if postgresql else ""))
    if postgresql:
        op.execute("DROP FUNCTION IF EXISTS task_figures_apply()")
    for table in reversed(TABLES):
        op.drop_table(table)
