"""export leases: who is sending an export and until when

A row in state ``sending`` names its worker (``lease_owner``) and a deadline the worker keeps
renewing (``lease_expires_at``). When a process dies mid-send the deadline passes and another
worker claims the row again — the same recovery the job queue has. The claim index covers the
export worker's query (one destination's due rows).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 02:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
        batch_op.add_column(
            sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_index(
            "ix_exports_claim", ["destination", "state", "next_attempt_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("exports", schema=None) as batch_op:
        batch_op.drop_index("ix_exports_claim")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("lease_owner")
