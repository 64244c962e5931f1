"""The outbox notes when each message was last handed to a sender (``handed_over_at``), so that the sweep hands over
only what no sender holds, however large the backlog; and indexes ``sent_at``, for /metrics' delivery times. Adding a
nullable column rewrites nothing; the downgrade drops both.

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


def upgrade():
    with op.batch_alter_table("outbox_messages") as batch:
        batch.add_column(sa.Column("handed_over_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_outbox_messages_sent_at", "outbox_messages", ["sent_at"])


def downgrade():
    op.drop_index("ix_outbox_messages_sent_at", table_name="outbox_messages")
    with op.batch_alter_table("outbox_messages") as batch:
        batch.drop_column("handed_over_at")
