"""cursors, blocks, published events, outbox

Revision ID: 0001
Revises:
Create Date: 2026-11-25 05:30:00.000000

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "cursors",
        sa.Column("chain_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("block_hash", sa.Text(), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("chain_id"),
        schema="ingest",
    )
    op.create_table(
        "blocks",
        sa.Column("chain_id", sa.BigInteger(), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("block_hash", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("chain_id", "block_number", name="blocks_pkey"),
        schema="ingest",
    )
    op.create_table(
        "published_events",
        sa.Column("chain_id", sa.BigInteger(), nullable=False),
        sa.Column("tx_hash", sa.Text(), nullable=False),
        sa.Column("log_index", sa.Integer(), nullable=False),
        sa.Column("block_number", sa.BigInteger(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("event", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("chain_id", "tx_hash", "log_index", name="published_events_pkey"),
        schema="ingest",
    )
    op.create_index(
        "published_events_block_idx", "published_events", ["chain_id", "block_number"], unique=False, schema="ingest"
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        schema="ingest",
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("outbox", schema="ingest")
    op.drop_index("published_events_block_idx", table_name="published_events", schema="ingest")
    op.drop_table("published_events", schema="ingest")
    op.drop_table("blocks", schema="ingest")
    op.drop_table("cursors", schema="ingest")
