"""Alembic environment: the app's engine and metadata, one migration run at a time."""

from alembic import context
from flask import current_app
from sqlalchemy import text

from models import UTCDateTime

# Any constant works: every process that migrates this database takes the same PostgreSQL lock.
MIGRATION_LOCK_KEY = 7_206_310_001

migrate_extension = current_app.extensions["migrate"]
target_metadata = migrate_extension.db.metadata


def render_item(type_, obj, autogen_context):
    """Write the app's UTC timestamp type as the plain column type it stores, so scripts need no app imports."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def include_object(obj, name, type_, reflected, compare_to):
    """Indexes the models create on one database only (``info["dialect"]``) are not expected on the others."""
    dialect = obj.info.get("dialect") if type_ == "index" and not reflected else None
    return dialect is None or dialect == context.get_context().dialect.name


def skip_empty_autogenerate(migration_context, revision, directives):
    """`flask db migrate` with no model changes writes no empty script."""
    if getattr(context.config.cmd_opts, "autogenerate", False) and directives[0].upgrade_ops.is_empty():
        directives[:] = []


def run_migrations_offline():
    """`flask db upgrade --sql`: print the SQL instead of running it."""
    url = migrate_extension.db.engine.url.render_as_string(hide_password=False)
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True, render_item=render_item)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    options = dict(migrate_extension.configure_args)
    options.setdefault("process_revision_directives", skip_empty_autogenerate)
    with migrate_extension.db.engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_item=render_item,
            include_object=include_object,
            **options,
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Building an index on a big table takes longer than any request may (DB_STATEMENT_TIMEOUT), and
                # so may waiting below for another instance's migration: neither is bound by the statement timeout.
                connection.execute(text("SET LOCAL statement_timeout = 0"))
                # Several instances may start `flask db upgrade` together; the others wait, then find nothing to do.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
