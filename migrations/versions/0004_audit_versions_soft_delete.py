"""History, safe concurrent edits, insight: task versions, closing and soft delete; the audit trail; idempotency.

Tasks gain ``version`` (every existing task starts at 1), ``closed_at`` and ``closed_by_id`` (tasks already
closed get their ``updated_at`` as ``closed_at``, the best estimate there is, and no closer), and ``deleted_at``.
The task counts now count live tasks only: the PostgreSQL trigger function is replaced, the SQLite triggers
rebuilt. New tables: ``task_events`` (append-only, enforced by triggers) and ``idempotency_keys``.

On SQLite the new foreign key and check constraint need a copy of the table (Alembic's batch mode), which drops
its triggers: they are dropped first and created again at the end. Trigger SQL is copied here on purpose, as in
0003: tests/test_task_counts.py checks that a migrated database has the triggers models.py creates.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COUNTS_FUNCTION = """CREATE OR REPLACE FUNCTION task_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO task_counts AS counts (status, task_type, contact_person_id, n)
        SELECT status, task_type, contact_person_id, count(*) FROM new_rows WHERE deleted_at IS NULL
        GROUP BY status, task_type, contact_person_id ORDER BY status, task_type, contact_person_id
        ON CONFLICT (status, task_type, contact_person_id) DO UPDATE SET n = counts.n + excluded.n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO task_counts AS counts (status, task_type, contact_person_id, n)
        SELECT status, task_type, contact_person_id, -count(*) FROM old_rows WHERE deleted_at IS NULL
        GROUP BY status, task_type, contact_person_id ORDER BY status, task_type, contact_person_id
        ON CONFLICT (status, task_type, contact_person_id) DO UPDATE SET n = counts.n + excluded.n;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Only rows whose status, type, assignee or deletion changed move between counters; a note edit writes
        -- nothing. A soft delete takes the task out of its counter, a restore puts it back.
        INSERT INTO task_counts AS counts (status, task_type, contact_person_id, n)
        SELECT status, task_type, contact_person_id, sum(delta) FROM (
            SELECT status, task_type, contact_person_id, 1 AS delta FROM new_rows WHERE deleted_at IS NULL
            UNION ALL
            SELECT status, task_type, contact_person_id, -1 FROM old_rows WHERE deleted_at IS NULL
        ) AS changes
        GROUP BY status, task_type, contact_person_id HAVING sum(delta) <> 0
        ORDER BY status, task_type, contact_person_id
        ON CONFLICT (status, task_type, contact_person_id) DO UPDATE SET n = counts.n + excluded.n;
    ELSE
        DELETE FROM task_counts;  -- TRUNCATE tasks
    END IF;
    RETURN NULL;
END
$$"""

_SQLITE_ADD = """
    INSERT INTO task_counts (status, task_type, contact_person_id, n)
    SELECT NEW.status, NEW.task_type, NEW.contact_person_id, 0 WHERE NEW.deleted_at IS NULL AND NOT EXISTS (
        SELECT 1 FROM task_counts
        WHERE status = NEW.status AND task_type = NEW.task_type AND contact_person_id IS NEW.contact_person_id
    );
    UPDATE task_counts SET n = n + 1
    WHERE NEW.deleted_at IS NULL
        AND status = NEW.status AND task_type = NEW.task_type AND contact_person_id IS NEW.contact_person_id;"""
_SQLITE_REMOVE = """
    UPDATE task_counts SET n = n - 1
    WHERE OLD.deleted_at IS NULL
        AND status = OLD.status AND task_type = OLD.task_type AND contact_person_id IS OLD.contact_person_id;"""
SQLITE_COUNTS_TRIGGERS = (
    f"CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks BEGIN{_SQLITE_ADD}\nEND",
    f"""CREATE TRIGGER task_counts_update AFTER UPDATE OF status, task_type, contact_person_id, deleted_at ON tasks
    WHEN OLD.status IS NOT NEW.status OR OLD.task_type IS NOT NEW.task_type
        OR OLD.contact_person_id IS NOT NEW.contact_person_id
        OR (OLD.deleted_at IS NULL) IS NOT (NEW.deleted_at IS NULL)
    BEGIN{_SQLITE_REMOVE}{_SQLITE_ADD}\nEND""",
    f"CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks BEGIN{_SQLITE_REMOVE}\nEND",
)
# 0003's, for the downgrade.
_OLD_SQLITE_ADD = """
    INSERT INTO task_counts (status, task_type, contact_person_id, n)
    SELECT NEW.status, NEW.task_type, NEW.contact_person_id, 0 WHERE NOT EXISTS (
        SELECT 1 FROM task_counts
        WHERE status = NEW.status AND task_type = NEW.task_type AND contact_person_id IS NEW.contact_person_id
    );
    UPDATE task_counts SET n = n + 1
    WHERE status = NEW.status AND task_type = NEW.task_type AND contact_person_id IS NEW.contact_person_id;"""
_OLD_SQLITE_REMOVE = """
    UPDATE task_counts SET n = n - 1
    WHERE status = OLD.status AND task_type = OLD.task_type AND contact_person_id IS OLD.contact_person_id;"""
OLD_SQLITE_COUNTS_TRIGGERS = (
    f"CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks BEGIN{_OLD_SQLITE_ADD}\nEND",
    f"""CREATE TRIGGER task_counts_update AFTER UPDATE OF status, task_type, contact_person_id ON tasks
    WHEN OLD.status IS NOT NEW.status OR OLD.task_type IS NOT NEW.task_type
        OR OLD.contact_person_id IS NOT NEW.contact_person_id
    BEGIN{_OLD_SQLITE_REMOVE}{_OLD_SQLITE_ADD}\nEND""",
    f"CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks BEGIN{_OLD_SQLITE_REMOVE}\nEND",
)
SQLITE_COUNTS_TRIGGER_NAMES = ("task_counts_insert", "task_counts_update", "task_counts_delete")

APPEND_ONLY_POSTGRESQL = (
    """CREATE OR REPLACE FUNCTION task_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = 'task_events is append-only: ' || TG_OP || ' is not allowed';
END
$$""",
    """CREATE TRIGGER task_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON task_events
    FOR EACH STATEMENT EXECUTE FUNCTION task_events_append_only()""",
)
APPEND_ONLY_SQLITE = (
    """CREATE TRIGGER task_events_no_update BEFORE UPDATE ON task_events
    BEGIN SELECT RAISE(ABORT, 'task_events is append-only: UPDATE is not allowed'); END""",
    """CREATE TRIGGER task_events_no_delete BEFORE DELETE ON task_events
    BEGIN SELECT RAISE(ABORT, 'task_events is append-only: DELETE is not allowed'); END""",
)
PARTIAL_INDEXES = {
    "ix_tasks_open_task_time": (["task_time"], "status = 'open' AND deleted_at IS NULL"),
    "ix_tasks_closed_at_date_created": (["closed_at", "date_created"], "closed_at IS NOT NULL AND deleted_at IS NULL"),
    "ix_tasks_deleted_at": (["deleted_at"], "deleted_at IS NOT NULL"),
}
ACTIONS = "('created', 'updated', 'status_changed', 'bulk_status_changed', 'deleted', 'restored', 'purged')"


def partial_index(name: str, columns: list[str], where: str) -> None:
    op.create_index(name, "tasks", columns, postgresql_where=sa.text(where), sqlite_where=sa.text(where))


def tasks_before_the_check() -> sa.Table:
    """The tasks table as 0003 left it plus this migration's columns: what SQLite's batch copy starts from, given
    rather than reflected so that ``flask db upgrade --sql`` can print the migration without a database."""
    uuid_fk = sa.ForeignKey("app_users.id", ondelete="SET NULL")
    return sa.Table(
        "tasks",
        sa.MetaData(naming_convention={"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}),
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("date_created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("entity_name", sa.String(length=255), nullable=False),
        sa.Column("task_type", sa.String(length=50), nullable=False),
        sa.Column("task_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("contact_person_id", sa.Uuid(), uuid_fk, nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("created_by_id", sa.Uuid(), sa.ForeignKey("app_users.id", ondelete="SET NULL"), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_by_id", sa.Uuid(), sa.ForeignKey("app_users.id", ondelete="SET NULL"), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
        sa.CheckConstraint("status IN ('open', 'closed')", name="ck_tasks_status"),
        *(sa.Index(name, *columns) for name, columns in SQLITE_INDEXES_BEFORE.items()),
    )


# The indexes SQLite's tasks table has after 0003 (its expression indexes are PostgreSQL's only).
SQLITE_INDEXES_BEFORE = {
    "ix_tasks_created_by_id": ["created_by_id"],
    "ix_tasks_date_created_id": ["date_created", "id"],
    "ix_tasks_task_time_id": ["task_time", "id"],
    "ix_tasks_updated_at_id": ["updated_at", "id"],
    "ix_tasks_status_id": ["status", "id"],
    "ix_tasks_status_date_created_id": ["status", "date_created", "id"],
    "ix_tasks_contact_person_id_date_created_id": ["contact_person_id", "date_created", "id"],
}


def upgrade():
    postgresql = op.get_bind().dialect.name == "postgresql"
    if not postgresql:
        for name in SQLITE_COUNTS_TRIGGER_NAMES:  # the batch copy below drops them with the old table
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.add_column("tasks", sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False))
    op.add_column("tasks", sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "tasks",
        sa.Column(
            "closed_by_id",
            sa.Uuid(),
            sa.ForeignKey("app_users.id", name=op.f("fk_tasks_closed_by_id_app_users"), ondelete="SET NULL"),
            nullable=True,
        ),
        inline_references=not postgresql,  # SQLite adds a foreign key only with its column
    )
    op.add_column("tasks", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE tasks SET closed_at = updated_at WHERE status = 'closed'")
    check = "(status = 'closed') = (closed_at IS NOT NULL)"
    if postgresql:
        op.create_check_constraint(op.f("ck_tasks_closed_at"), "tasks", check)
    else:
        with op.batch_alter_table("tasks", copy_from=tasks_before_the_check()) as batch:
            batch.create_check_constraint(op.f("ck_tasks_closed_at"), check)

    # The default sort's index keeps the live tasks only.
    op.drop_index("ix_tasks_date_created_id", table_name="tasks")
    partial_index("ix_tasks_date_created_id", ["date_created", "id"], "deleted_at IS NULL")
    for name, (columns, where) in PARTIAL_INDEXES.items():
        partial_index(name, columns, where)

    if postgresql:
        op.execute(COUNTS_FUNCTION)
    else:
        for statement in SQLITE_COUNTS_TRIGGERS:
            op.execute(statement)

    op.create_table(
        "task_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("task_id", sa.Uuid(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_id", sa.Uuid(), nullable=True),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("field", sa.String(length=50), nullable=True),
        sa.Column("old_value", sa.JSON(), nullable=True),
        sa.Column("new_value", sa.JSON(), nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.CheckConstraint(f"action IN {ACTIONS}", name=op.f("ck_task_events_action")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_events")),
    )
    op.create_index("ix_task_events_task_id_id", "task_events", ["task_id", "id"])
    for statement in APPEND_ONLY_POSTGRESQL if postgresql else APPEND_ONLY_SQLITE:
        op.execute(statement)

    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["app_users.id"], name=op.f("fk_idempotency_keys_user_id_app_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", "key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index(op.f("ix_idempotency_keys_expires_at"), "idempotency_keys", ["expires_at"])


def downgrade():
    """Back to 0003. Deleted tasks are removed for good (0003 has no soft delete); the trail and keys go."""
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.drop_index(op.f("ix_idempotency_keys_expires_at"), table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    if postgresql:
        op.execute("DROP TRIGGER IF EXISTS task_events_append_only ON task_events")
        op.execute("DROP FUNCTION IF EXISTS task_events_append_only()")
    op.drop_index("ix_task_events_task_id_id", table_name="task_events")
    op.drop_table("task_events")  # DROP TABLE fires no DELETE trigger

    if not postgresql:
        for name in SQLITE_COUNTS_TRIGGER_NAMES:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.execute("DELETE FROM tasks WHERE deleted_at IS NOT NULL")  # not counted, so the counts stay right
    for name in PARTIAL_INDEXES:
        op.drop_index(name, table_name="tasks")
    op.drop_index("ix_tasks_date_created_id", table_name="tasks")
    op.create_index("ix_tasks_date_created_id", "tasks", ["date_created", "id"])
    with op.batch_alter_table("tasks") as batch:
        batch.drop_constraint(op.f("ck_tasks_closed_at"), type_="check")
        batch.drop_constraint(op.f("fk_tasks_closed_by_id_app_users"), type_="foreignkey")
        batch.drop_column("deleted_at")
        batch.drop_column("closed_by_id")
        batch.drop_column("closed_at")
        batch.drop_column("version")
    if postgresql:
        op.execute(COUNTS_FUNCTION.replace(" WHERE deleted_at IS NULL", ""))
    else:
        for statement in OLD_SQLITE_COUNTS_TRIGGERS:
            op.execute(statement)
