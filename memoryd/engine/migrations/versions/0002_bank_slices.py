"""Bank slices: each shard process of a cluster holds one slice of a bank.

bank_slices has one row per (bank, shard): the slice's folder under that
shard's banks/, its bytes and rows, whether it is trained, its checksum.
banks.used_bytes/count become the sum over the bank's slices. Every existing
bank gets one slice of shard 0 (the single process that wrote the catalog),
copied from its row. sessions.shard names the shard process that holds a
session's bank (0 for every existing one).

Tolerant of a half-applied state (the table or the column already there, a
bank that already has a slice): a catalog whose alembic_version was lost is
stamped 0001 and comes through here again.

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    if not inspector.has_table("bank_slices"):
        op.create_table(
            "bank_slices",
            sa.Column("bank", sa.String(64), sa.ForeignKey("banks.name"), nullable=False),
            sa.Column("shard", sa.Integer, nullable=False),
            sa.Column("storage", sa.String(128), nullable=False),
            sa.Column("used_bytes", sa.BigInteger, nullable=False),
            sa.Column("count", sa.BigInteger, nullable=False),
            sa.Column("trained", sa.Boolean, nullable=False),
            sa.Column("checksum", sa.String(80), nullable=False, server_default=""),
            sa.Column("updated_at", sa.Float, nullable=False),
            sa.PrimaryKeyConstraint("bank", "shard"),
        )
    if "shard" not in {c["name"] for c in inspector.get_columns("sessions")}:
        op.add_column("sessions", sa.Column("shard", sa.Integer, nullable=False, server_default="0"))

    banks = sa.table("banks", sa.column("name"), sa.column("storage"), sa.column("used_bytes"),
                     sa.column("count"), sa.column("trained"), sa.column("checksum"),
                     sa.column("updated_at"))
    slices = sa.table("bank_slices", sa.column("bank"), sa.column("shard"), sa.column("storage"),
                      sa.column("used_bytes"), sa.column("count"), sa.column("trained"),
                      sa.column("checksum"), sa.column("updated_at"))
    have = sa.select(slices.c.bank)
    op.execute(slices.insert().from_select(
        ["bank", "shard", "storage", "used_bytes", "count", "trained", "checksum", "updated_at"],
        sa.select(banks.c.name, sa.literal(0, sa.Integer), banks.c.storage, banks.c.used_bytes,
                  banks.c.count, banks.c.trained, banks.c.checksum, banks.c.updated_at)
        .where(banks.c.name.not_in(have))))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("shard")
    op.drop_table("bank_slices")
