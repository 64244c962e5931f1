"""Initial schema: users and tasks, with an index on every task filter and sort column.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TASK_INDEXES = (
    "date_created",
    "entity_name",
    "task_type",
    "task_time",
    "contact_person_id",
    "status",
    "created_by_id",
    "updated_at",
)


def upgrade():
    op.create_table(
        "app_users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("username", sa.String(length=80), nullable=False),
        sa.Column("email", sa.String(length=255), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("full_name", sa.String(length=120), nullable=False),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_app_users")),
        sa.UniqueConstraint("email", name=op.f("uq_app_users_email")),
        sa.UniqueConstraint("username", name=op.f("uq_app_users_username")),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("date_created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("entity_name", sa.String(length=255), nullable=False),
        sa.Column("task_type", sa.String(length=50), nullable=False),
        sa.Column("task_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("contact_person_id", sa.Uuid(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("created_by_id", sa.Uuid(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('open', 'closed')", name=op.f("ck_tasks_status")),
        sa.ForeignKeyConstraint(
            ["contact_person_id"],
            ["app_users.id"],
            name=op.f("fk_tasks_contact_person_id_app_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["created_by_id"],
            ["app_users.id"],
            name=op.f("fk_tasks_created_by_id_app_users"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
    )
    for column in TASK_INDEXES:
        op.create_index(op.f(f"ix_tasks_{column}"), "tasks", [column])


def downgrade():
    for column in TASK_INDEXES:
        op.drop_index(op.f(f"ix_tasks_{column}"), table_name="tasks")
    op.drop_table("tasks")
    op.drop_table("app_users")
