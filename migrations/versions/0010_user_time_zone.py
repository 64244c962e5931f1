"""Each user's time zone (issue 16: "today" and "this week" are the user's own): ``app_users.time_zone``, an IANA
name, NULL for the firm's DEFAULT_TIME_ZONE, as every existing account starts. A nullable column rewrites nothing;
the downgrade drops it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("app_users") as batch:
        batch.add_column(sa.Column("time_zone", sa.String(length=64), nullable=True))


def downgrade():
    with op.batch_alter_table("app_users") as batch:
        batch.drop_column("time_zone")
