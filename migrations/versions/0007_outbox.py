"""The transactional outbox: messages queued in the transaction of the change that caused them (models.OutboxMessage,
outbox.py). A new, empty table; the downgrade drops it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

DUE = sa.text("state IN ('pending', 'sending')")


def upgrade():
    op.create_table(
        "outbox_messages",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("recipient", sa.String(length=320), nullable=False),
        sa.Column("event_key", sa.String(length=160), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("state IN ('pending', 'sending', 'sent', 'failed')", name=op.f("ck_outbox_messages_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_messages")),
        sa.UniqueConstraint("event_key", "recipient", name=op.f("uq_outbox_messages_event_key")),
    )
    op.create_index(
        "ix_outbox_messages_due", "outbox_messages", ["next_attempt_at"], postgresql_where=DUE, sqlite_where=DUE
    )
    op.create_index("ix_outbox_messages_state_created_at", "outbox_messages", ["state", "created_at"])


def downgrade():
    op.drop_index("ix_outbox_messages_state_created_at", table_name="outbox_messages")
    op.drop_index("ix_outbox_messages_due", table_name="outbox_messages")
    op.drop_table("outbox_messages")
