"""Sessions and roles: users gain is_admin and phone; login sessions and the token blocklist.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from flask import current_app

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def admin_username() -> str:
    try:
        return (current_app.config.get("ADMIN_USERNAME") or "admin").strip().lower()
    except RuntimeError:  # run by alembic outside Flask
        return "admin"


def upgrade():
    op.add_column("app_users", sa.Column("is_admin", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("app_users", sa.Column("phone", sa.String(length=32), nullable=True))
    # The administrator the app created (ADMIN_USERNAME, "admin" by default) keeps its powers; a database
    # without that account makes its oldest account the administrator, so someone can manage the rest.
    users = sa.table(
        "app_users",
        sa.column("id", sa.Uuid()),
        sa.column("username", sa.String()),
        sa.column("created_at"),
        sa.column("is_admin", sa.Boolean()),
    )
    source = users.alias("source")  # subqueries over their own copy: not correlated with the row updated
    named = sa.select(source.c.id).where(source.c.username == admin_username()).scalar_subquery()
    oldest = sa.select(source.c.id).order_by(source.c.created_at, source.c.id).limit(1).scalar_subquery()
    op.execute(users.update().where(users.c.id == sa.func.coalesce(named, oldest)).values(is_admin=True))

    op.create_table(
        "login_sessions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("refresh_jti", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["app_users.id"], name=op.f("fk_login_sessions_user_id_app_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_login_sessions")),
    )
    op.create_index(op.f("ix_login_sessions_user_id"), "login_sessions", ["user_id"])
    op.create_index(op.f("ix_login_sessions_expires_at"), "login_sessions", ["expires_at"])

    op.create_table(
        "revoked_tokens",
        sa.Column("jti", sa.String(length=36), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("jti", name=op.f("pk_revoked_tokens")),
    )
    op.create_index(op.f("ix_revoked_tokens_expires_at"), "revoked_tokens", ["expires_at"])


def downgrade():
    op.drop_index(op.f("ix_revoked_tokens_expires_at"), table_name="revoked_tokens")
    op.drop_table("revoked_tokens")
    op.drop_index(op.f("ix_login_sessions_expires_at"), table_name="login_sessions")
    op.drop_index(op.f("ix_login_sessions_user_id"), table_name="login_sessions")
    op.drop_table("login_sessions")
    with op.batch_alter_table("app_users") as batch:
        batch.drop_column("phone")
        batch.drop_column("is_admin")
