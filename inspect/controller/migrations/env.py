"""Alembic environment: the controller runs migrations itself, on start, with its own engine."""

from __future__ import annotations

from alembic import context

from pouchline.inspect.controller.schema import Base

config = context.config


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("pouchline runs its migrations through pouchline.inspect.controller.database.migrate")
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
