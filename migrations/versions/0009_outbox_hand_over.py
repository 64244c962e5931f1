"""The outbox notes when each message was handed to the broker (``handed_over_at``), so that the sweep hands over only
what no sender holds, however large the backlog, reading the due messages in batches along ``(next_attempt_at, id)``
(the due index gains ``id``); and indexes ``sent_at``, for /metrics' delivery times. Adding a nullable column
rewrites nothing, and the outbox's unsent rows are few: rebuilding their partial index is quick. The downgrade
restores the previous schema.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


DUE = sa.text("state IN ('pending', 'sending')")


def due_index(*columns: str) -> None:
    op.drop_index("ix_outbox_messages_due", table_name="outbox_messages")
    op.create_index("ix_outbox_messages_due", "outbox_messages", list(columns), postgresql_where=DUE, sqlite_where=DUE)


def upgrade():
    with op.batch_alter_table("outbox_messages") as batch:
        batch.add_column(sa.Column("handed_over_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_outbox_messages_sent_at", "outbox_messages", ["sent_at"])
    due_index("next_attempt_at", "id")


def downgrade():
    due_index("next_attempt_at")
    op.drop_index("ix_outbox_messages_sent_at", table_name="outbox_messages")
    with op.batch_alter_table("outbox_messages") as batch:
        batch.drop_column("handed_over_at")
