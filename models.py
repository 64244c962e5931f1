"""Database models: users and the tasks they log, create and are assigned."""

import sqlite3
import uuid
from datetime import UTC, datetime
from typing import Any

from flask import current_app
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    event,
    false,
    func,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, foreign, mapped_column, registry, relationship
from sqlalchemy.types import TypeDecorator
from werkzeug.security import check_password_hash, generate_password_hash

TASK_STATUSES = ("open", "closed")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timezone-aware timestamp stored as UTC and always read back with its UTC offset.

    PostgreSQL's timestamptz converts by itself; SQLite keeps whatever it is given and
    returns it naive, so values are converted to UTC on the way in and tagged on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    registry = registry(
        # Named constraints keep migrations reviewable and identical on both databases.
        metadata=MetaData(
            naming_convention={
                "ix": "ix_%(column_0_label)s",
                "uq": "uq_%(table_name)s_%(column_0_name)s",
                "ck": "ck_%(table_name)s_%(constraint_name)s",
                "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
                "pk": "pk_%(table_name)s",
            }
        ),
        type_annotation_map={datetime: UTCDateTime},
    )


# A view commits once, at its end, then serialises what it wrote: no need to reload it all from the database.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})


def postgresql_only(index: Index) -> Index:
    """An index created on PostgreSQL only (migrations/env.py reads ``info`` so autogenerate agrees)."""
    index.info["dialect"] = "postgresql"
    return index.ddl_if(dialect="postgresql")


def insert(entity):
    """An INSERT that can say ON CONFLICT DO NOTHING: each database's own construct, for the session's database."""
    dialect = postgresql if db.session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(entity)


def simple_lower(text):
    """Lower case one character at a time, as PostgreSQL's lower() does: no final-sigma rule, and "İ" gives "i"."""
    if not isinstance(text, str):
        return text
    return "".join(character.lower()[0] for character in text)


@event.listens_for(Engine, "connect")
def _configure_sqlite(dbapi_connection, _connection_record):
    """Make SQLite behave like PostgreSQL where the API depends on it."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.isolation_level = None  # the driver's own BEGIN comes too late; see _begin_sqlite
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        # INSERT OR REPLACE deletes the row it replaces: with this, that fires the delete trigger of task_counts.
        dbapi_connection.execute("PRAGMA recursive_triggers = ON")
        # SQLite's own lower() folds ASCII only; case-insensitive filters must match "MÜLLER" too.
        dbapi_connection.create_function("lower", 1, simple_lower, deterministic=True)


@event.listens_for(Engine, "begin")
def _begin_sqlite(connection):
    """Take SQLite's write lock when a transaction begins, as SQLAlchemy's pysqlite notes suggest: writers
    then queue like PostgreSQL's row locks make them, and every timestamp is taken after the lock."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class User(db.Model):
    __tablename__ = "app_users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    username: Mapped[str] = mapped_column(String(80), unique=True)
    email: Mapped[str] = mapped_column(String(255), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    full_name: Mapped[str] = mapped_column(String(120))
    is_active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    is_admin: Mapped[bool] = mapped_column(default=False, server_default=false())
    phone: Mapped[str | None] = mapped_column(String(32))
    # When the account proved it owns ``email`` (a link followed); None while it has not. Only self-registration
    # with REGISTRATION=domain waits for it; accounts made any other way count as verified from their creation.
    email_verified_at: Mapped[datetime | None] = mapped_column(default=utcnow)
    # The IANA time zone the user chose (their "today" and "this week"); None: the firm's DEFAULT_TIME_ZONE.
    chosen_time_zone: Mapped[str | None] = mapped_column("time_zone", String(64))

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password, method=current_app.config["PASSWORD_HASH_METHOD"])

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)

    def password_needs_rehash(self) -> bool:
        """Was the stored hash made with other parameters than the configured method (weaker ones, say)?"""
        return self.password_hash.partition("$")[0] != current_app.config["PASSWORD_HASH_METHOD"]

    @property
    def time_zone(self) -> str:
        """The user's time zone: the one they chose, else the firm's DEFAULT_TIME_ZONE."""
        return self.chosen_time_zone or current_app.config["DEFAULT_TIME_ZONE"]

    def __repr__(self) -> str:
        return f"<User {self.username}>"


class Task(db.Model):
    __tablename__ = "tasks"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    date_created: Mapped[datetime] = mapped_column(default=utcnow)
    entity_name: Mapped[str] = mapped_column(String(255))
    task_type: Mapped[str] = mapped_column(String(50))
    task_time: Mapped[datetime] = mapped_column()
    contact_person_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("app_users.id", ondelete="SET NULL"))
    note: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(10), default="open")
    created_by_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("app_users.id", ondelete="SET NULL"), index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Counts every change: the ETag that If-Match compares. The ORM adds one at each UPDATE it sends (and checks the
    # old value in its WHERE); statements that write tasks themselves (the bulk update) add it too.
    version: Mapped[int] = mapped_column(server_default=text("1"))
    # Set when the task is closed, cleared when it is opened again (the check below holds them to the status).
    closed_at: Mapped[datetime | None] = mapped_column()
    closed_by_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("app_users.id", ondelete="SET NULL"))
    # Soft delete: hidden from every list, count and figure until restored or purged (flask purge-deleted).
    deleted_at: Mapped[datetime | None] = mapped_column()

    # A task is always shown with its people: load them in the same statement, never one by one.
    contact_person: Mapped[User | None] = relationship(foreign_keys=[contact_person_id], lazy="joined")
    created_by: Mapped[User | None] = relationship(foreign_keys=[created_by_id], lazy="joined")
    closed_by: Mapped[User | None] = relationship(foreign_keys=[closed_by_id], lazy="joined")

    __mapper_args__ = {"version_id_col": version}
    __table_args__ = (
        CheckConstraint("status IN ('open', 'closed')", name="status"),
        CheckConstraint("(status = 'closed') = (closed_at IS NOT NULL)", name="closed_at"),
        # One index per sort the list offers, ending in id like the ORDER BY, so a page (and a keyset cursor)
        # is read from the index in order, however deep; the filters used most keep the default sort.
        # The default sort's index holds the live tasks only: the list never reads past deleted ones, and the
        # dashboard counts tasks created per week from the index alone.
        Index(
            "ix_tasks_date_created_id",
            "date_created",
            "id",
            postgresql_where=text("deleted_at IS NULL"),
            sqlite_where=text("deleted_at IS NULL"),
        ),
        Index("ix_tasks_task_time_id", "task_time", "id"),
        Index("ix_tasks_updated_at_id", "updated_at", "id"),
        Index("ix_tasks_status_id", "status", "id"),
        Index("ix_tasks_status_date_created_id", "status", "date_created", "id"),
        Index("ix_tasks_contact_person_id_date_created_id", "contact_person_id", "date_created", "id"),
        # The dashboard's schedule (overdue, due today, due this week) reads the open tasks by due time...
        Index(
            "ix_tasks_open_task_time",
            "task_time",
            postgresql_where=text("status = 'open' AND deleted_at IS NULL"),
            sqlite_where=text("status = 'open' AND deleted_at IS NULL"),
        ),
        # ...and its closing figures the closed ones by closing time, with their creation for the time to close.
        Index(
            "ix_tasks_closed_at_date_created",
            "closed_at",
            "date_created",
            postgresql_where=text("closed_at IS NOT NULL AND deleted_at IS NULL"),
            sqlite_where=text("closed_at IS NOT NULL AND deleted_at IS NULL"),
        ),
        Index(
            "ix_tasks_deleted_at",
            "deleted_at",
            postgresql_where=text("deleted_at IS NOT NULL"),
            sqlite_where=text("deleted_at IS NOT NULL"),
        ),
        # Text sorts ignore case (lower(col), col, id). On SQLite lower() is the app's own function, which
        # another client of the file would not have: expression indexes are PostgreSQL's only.
        postgresql_only(Index("ix_tasks_entity_name_sort", func.lower(entity_name), entity_name, id)),
        postgresql_only(Index("ix_tasks_task_type_sort", func.lower(task_type), task_type, id)),
        # The case-insensitive substring filters (ILIKE '%...%') use trigram indexes instead of a scan.
        postgresql_only(
            Index(
                "ix_tasks_entity_name_trgm",
                entity_name,
                postgresql_using="gin",
                postgresql_ops={"entity_name": "gin_trgm_ops"},
            )
        ),
        postgresql_only(
            Index(
                "ix_tasks_task_type_trgm",
                task_type,
                postgresql_using="gin",
                postgresql_ops={"task_type": "gin_trgm_ops"},
            )
        ),
    )

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.entity_name!r} {self.status}>"


# How many live (not deleted) tasks there are per (status, task type, assignee): kept exact by triggers in the same
# transaction as every write to tasks, so totals and the dashboard never scan the tasks. A few hundred rows, however
# many tasks.
task_counts = Table(
    "task_counts",
    db.metadata,
    Column("status", String(10), nullable=False),
    Column("task_type", String(50), nullable=False),
    Column("contact_person_id", Uuid(), nullable=True),  # no foreign key: the triggers move a deleted user's counts
    Column("n", Integer, nullable=False),
    Index(
        "uq_task_counts_key",
        "status",
        "task_type",
        "contact_person_id",
        unique=True,
        postgresql_nulls_not_distinct=True,  # unassigned tasks share one row per status and type
    ),
)

# PostgreSQL: one trigger per statement, fed by transition tables, so a bulk UPDATE of 1000 tasks costs one
# grouped upsert. Groups are upserted in key order, so two writers never lock counters in opposite orders.
TASK_COUNTS_POSTGRESQL = (
    """CREATE OR REPLACE FUNCTION task_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO task_counts AS counts (status, task_type, contact_person_id, n)
        SELECT status, task_type, contact_person_id, count(*) FROM new_rows WHERE deleted_at IS NULL
        GROUP BY status, task_type, contact_person_id ORDER BY status, task_type, contact_person_id
        ON CONFLICT (status, task_type, contact_person_id) DO UPDATE SET n = counts.n + excluded.n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO task_counts AS counts (status, task_type, contact_person_id, n)
        SELECT status, task_type, contact_person_id, -count(*) FROM old_rows WHERE deleted_at IS NULL
        GROUP BY status, task_type, contact_person_id ORDER BY status, task_type, contact_person_id
        ON CONFLICT (status, task_type, contact_person_id) DO UPDATE SET n = counts.n + excluded.n;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Only rows whose status, type, assignee or deletion changed move between counters; a note edit writes
        -- nothing. A soft delete takes the task out of its counter, a restore puts it back.
        INSERT INTO task_counts AS counts (status, task_type, contact_person_id, n)
        SELECT status, task_type, contact_person_id, sum(delta) FROM (
            SELECT status, task_type, contact_person_id, 1 AS delta FROM new_rows WHERE deleted_at IS NULL
            UNION ALL
            SELECT status, task_type, contact_person_id, -1 FROM old_rows WHERE deleted_at IS NULL
        ) AS changes
        GROUP BY status, task_type, contact_person_id HAVING sum(delta) <> 0
        ORDER BY status, task_type, contact_person_id
        ON CONFLICT (status, task_type, contact_person_id) DO UPDATE SET n = counts.n + excluded.n;
    ELSE
        DELETE FROM task_counts;  -- TRUNCATE tasks
    END IF;
    RETURN NULL;
END
$$""",
    """CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply()""",
    """CREATE TRIGGER task_counts_update AFTER UPDATE ON tasks REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply()""",
    """CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply()""",
    """CREATE TRIGGER task_counts_truncate AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply()""",
)

# SQLite has row triggers only; it has one writer at a time, so "add the row if missing, then count" is safe.
# Deleted tasks are not counted: each trigger acts only where the row it takes out or puts in is live.
_SQLITE_ADD = """
    INSERT INTO task_counts (status, task_type, contact_person_id, n)
    SELECT NEW.status, NEW.task_type, NEW.contact_person_id, 0 WHERE NEW.deleted_at IS NULL AND NOT EXISTS (
        SELECT 1 FROM task_counts
        WHERE status = NEW.status AND task_type = NEW.task_type AND contact_person_id IS NEW.contact_person_id
    );
    UPDATE task_counts SET n = n + 1
    WHERE NEW.deleted_at IS NULL
        AND status = NEW.status AND task_type = NEW.task_type AND contact_person_id IS NEW.contact_person_id;"""
_SQLITE_REMOVE = """
    UPDATE task_counts SET n = n - 1
    WHERE OLD.deleted_at IS NULL
        AND status = OLD.status AND task_type = OLD.task_type AND contact_person_id IS OLD.contact_person_id;"""
TASK_COUNTS_SQLITE = (
    f"CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks BEGIN{_SQLITE_ADD}\nEND",
    f"""CREATE TRIGGER task_counts_update AFTER UPDATE OF status, task_type, contact_person_id, deleted_at ON tasks
    WHEN OLD.status IS NOT NEW.status OR OLD.task_type IS NOT NEW.task_type
        OR OLD.contact_person_id IS NOT NEW.contact_person_id
        OR (OLD.deleted_at IS NULL) IS NOT (NEW.deleted_at IS NULL)
    BEGIN{_SQLITE_REMOVE}{_SQLITE_ADD}\nEND""",
    f"CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks BEGIN{_SQLITE_REMOVE}\nEND",
)

for _statement in TASK_COUNTS_POSTGRESQL:
    event.listen(db.metadata, "after_create", DDL(_statement).execute_if(dialect="postgresql"))
for _statement in TASK_COUNTS_SQLITE:
    event.listen(db.metadata, "after_create", DDL(_statement).execute_if(dialect="sqlite"))
event.listen(
    db.metadata, "before_create", DDL("CREATE EXTENSION IF NOT EXISTS pg_trgm").execute_if(dialect="postgresql")
)
event.listen(
    db.metadata, "after_drop", DDL("DROP FUNCTION IF EXISTS task_counts_apply()").execute_if(dialect="postgresql")
)

# How many live tasks there are per (entity name, status), kept like task_counts: the partial entity-name filter's
# exact total and the facets' entity names are then summed from a few thousand rows (one per name and status in use)
# instead of counted from the tasks. A name is stored as the tasks hold it, so that the list's filter (ILIKE on
# PostgreSQL, lower() LIKE lower() on SQLite) selects a kept row exactly when it selects that row's tasks. Rows whose
# count falls to 0 stay, as in task_counts, and are left out where they are read.
entity_name_counts = Table(
    "entity_name_counts",
    db.metadata,
    Column("entity_name", String(255), primary_key=True),
    Column("status", String(10), primary_key=True),
    Column("n", Integer, nullable=False),
    # The substring filter through a trigram index, as on tasks: ILIKE folds case per row, and a scan of the 7,363
    # rows at a million tasks took 11 ms (0.2 ms by the index).
    postgresql_only(
        Index(
            "ix_entity_name_counts_entity_name_trgm",
            "entity_name",
            postgresql_using="gin",
            postgresql_ops={"entity_name": "gin_trgm_ops"},
        )
    ),
)

# PostgreSQL: one trigger per statement with transition tables, each write's changes grouped into one upsert in key
# order, as for task_counts. An update that moves no task between names, statuses or out of the live ones writes
# nothing.
ENTITY_NAME_COUNTS_POSTGRESQL = (
    """CREATE OR REPLACE FUNCTION entity_name_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO entity_name_counts AS counts (entity_name, status, n)
        SELECT entity_name, status, count(*) FROM new_rows WHERE deleted_at IS NULL
        GROUP BY entity_name, status ORDER BY entity_name, status
        ON CONFLICT (entity_name, status) DO UPDATE SET n = counts.n + excluded.n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO entity_name_counts AS counts (entity_name, status, n)
        SELECT entity_name, status, -count(*) FROM old_rows WHERE deleted_at IS NULL
        GROUP BY entity_name, status ORDER BY entity_name, status
        ON CONFLICT (entity_name, status) DO UPDATE SET n = counts.n + excluded.n;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO entity_name_counts AS counts (entity_name, status, n)
        SELECT entity_name, status, sum(delta) FROM (
            SELECT entity_name, status, 1 AS delta FROM new_rows WHERE deleted_at IS NULL
            UNION ALL
            SELECT entity_name, status, -1 FROM old_rows WHERE deleted_at IS NULL
        ) AS changes
        GROUP BY entity_name, status HAVING sum(delta) <> 0 ORDER BY entity_name, status
        ON CONFLICT (entity_name, status) DO UPDATE SET n = counts.n + excluded.n;
    ELSE
        TRUNCATE entity_name_counts;  -- TRUNCATE tasks
    END IF;
    RETURN NULL;
END
$$""",
    """CREATE TRIGGER entity_name_counts_insert AFTER INSERT ON tasks REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION entity_name_counts_apply()""",
    """CREATE TRIGGER entity_name_counts_update AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION entity_name_counts_apply()""",
    """CREATE TRIGGER entity_name_counts_delete AFTER DELETE ON tasks REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION entity_name_counts_apply()""",
    """CREATE TRIGGER entity_name_counts_truncate AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION entity_name_counts_apply()""",
)


def _sqlite_entity_names(row: str, delta: str) -> str:
    """The row triggers' upsert that counts ``row`` (NEW or OLD) ``delta`` times, if it is live."""
    return f"""
    INSERT INTO entity_name_counts (entity_name, status, n)
    SELECT {row}.entity_name, {row}.status, {delta} WHERE {row}.deleted_at IS NULL
    ON CONFLICT (entity_name, status) DO UPDATE SET n = n + excluded.n;"""


ENTITY_NAME_COUNTS_SQLITE = (
    f"CREATE TRIGGER entity_name_counts_insert AFTER INSERT ON tasks BEGIN{_sqlite_entity_names('NEW', '1')}\nEND",
    f"""CREATE TRIGGER entity_name_counts_update AFTER UPDATE OF entity_name, status, deleted_at ON tasks
    WHEN OLD.entity_name IS NOT NEW.entity_name OR OLD.status IS NOT NEW.status
        OR (OLD.deleted_at IS NULL) IS NOT (NEW.deleted_at IS NULL)
    BEGIN{_sqlite_entity_names("OLD", "-1")}{_sqlite_entity_names("NEW", "1")}\nEND""",
    f"CREATE TRIGGER entity_name_counts_delete AFTER DELETE ON tasks BEGIN{_sqlite_entity_names('OLD', '-1')}\nEND",
)

for _statement in ENTITY_NAME_COUNTS_POSTGRESQL:
    event.listen(db.metadata, "after_create", DDL(_statement).execute_if(dialect="postgresql"))
for _statement in ENTITY_NAME_COUNTS_SQLITE:
    event.listen(db.metadata, "after_create", DDL(_statement).execute_if(dialect="sqlite"))
event.listen(
    db.metadata,
    "after_drop",
    DDL("DROP FUNCTION IF EXISTS entity_name_counts_apply()").execute_if(dialect="postgresql"),
)

# The dashboard's time-based figures, kept like task_counts by triggers in the transaction of every write: the
# dashboard then reads a few thousand kept rows at a million tasks and, where one of its windows starts or ends within
# a day, that day's part of an index; never all the tasks of a period. Days are UTC days (on SQLite, the first ten
# characters of the stored timestamp); deleted tasks are never counted. Rows whose count falls to 0 stay, as in
# task_counts.
#
# task_day_counts: live tasks per (kind, day, status). "created": by status and the day of date_created; "due": open
# tasks by the day of task_time; "closed": closed tasks by the day of closed_at.
task_day_counts = Table(
    "task_day_counts",
    db.metadata,
    Column("kind", String(10), primary_key=True),
    Column("day", Date, primary_key=True),  # before status: a run of days is one range of the key
    Column("status", String(10), primary_key=True),
    Column("n", Integer, nullable=False),
)
# The times to close (closed_at - date_created, in microseconds) of the live closed tasks, for an exact median over
# any run of closing days without sorting them all: how many there are per (closing day, bucket), a few dozen rows a
# day, which tells the bucket of the middle one and its rank in it; and each time (with how many closings took
# exactly that long) per (bucket, closing day), from which that bucket's are read in order.
time_to_close_counts = Table(
    "time_to_close_counts",
    db.metadata,
    Column("day", Date, primary_key=True),
    Column("bucket", Integer, primary_key=True),
    Column("n", Integer, nullable=False),
)
times_to_close = Table(
    "times_to_close",
    db.metadata,
    Column("bucket", Integer, primary_key=True),
    Column("day", Date, primary_key=True),
    Column("microseconds", BigInteger, primary_key=True),
    Column("n", Integer, nullable=False),
)


def time_to_close_bucket(microseconds: int) -> int:
    """The bucket of a time to close, as ``time_to_close_bucket_sql`` computes it: 20 per digit of the number of
    microseconds, plus its first two digits divided by 5 (18 buckets per power of ten, each 5% to 50% wide), negative
    for negative times (a task closed before it was created, which only plain SQL can write). It never decreases as
    the time grows, so the buckets are in the order of the times they hold; and it is integer arithmetic on the
    digits, exact and the same on both databases."""
    digits = str(abs(microseconds))
    size = 20 * len(digits) + int(digits[:2]) // 5
    return -size if microseconds < 0 else size


def time_to_close_bucket_sql(microseconds: str) -> str:
    """SQL for ``time_to_close_bucket`` of the (integer) SQL expression ``microseconds``, the same on both databases."""
    digits = f"CAST(abs({microseconds}) AS TEXT)"
    sign = f"CASE WHEN {microseconds} < 0 THEN -1 ELSE 1 END"
    return f"({sign}) * (20 * length({digits}) + CAST(substr({digits}, 1, 2) AS INTEGER) / 5)"


def microseconds_to_close_sql(dialect: str, closed_at: str, date_created: str) -> str:
    """SQL for ``closed_at - date_created`` in whole microseconds, exactly. PostgreSQL's epoch of the interval is an
    exact numeric. SQLite keeps timestamps as text ('2025-01-15 10:00:00.123456') and its date functions round to the
    millisecond: the whole seconds come from strftime('%s') of the first 19 characters, the microseconds from the
    digits after them (as a fraction, rounded once more after the subtraction: exact for six digits)."""
    if dialect == "postgresql":
        return f"CAST(extract(epoch FROM {closed_at} - {date_created}) * 1000000 AS BIGINT)"

    def whole(column: str) -> str:
        return f"CAST(strftime('%s', substr({column}, 1, 19)) AS INTEGER)"

    def fraction(column: str) -> str:
        return f"CAST(substr({column}, 20) AS REAL)"

    return (
        f"(({whole(closed_at)} - {whole(date_created)}) * 1000000"
        f" + CAST(round(({fraction(closed_at)} - {fraction(date_created)}) * 1000000) AS INTEGER))"
    )


# PostgreSQL: one trigger per statement, fed by the transition tables, as for task_counts. Each write's changes are
# the rows it put in (+1) and took out (-1), live ones only; every kept table gets one grouped upsert of them, in key
# order and always in the same order of tables, so that writers never lock kept rows in opposite orders. An update
# that moves nothing (a note, an assignee) cancels out and writes nothing.
_POSTGRESQL_FIGURES_CHANGES = {
    "INSERT": "SELECT status, date_created, task_time, closed_at, 1 AS delta FROM new_rows WHERE deleted_at IS NULL",
    "DELETE": "SELECT status, date_created, task_time, closed_at, -1 AS delta FROM old_rows WHERE deleted_at IS NULL",
    "UPDATE": """SELECT status, date_created, task_time, closed_at, 1 AS delta FROM new_rows WHERE deleted_at IS NULL
            UNION ALL
            SELECT status, date_created, task_time, closed_at, -1 FROM old_rows WHERE deleted_at IS NULL""",
}
_POSTGRESQL_CLOSINGS = f"""SELECT day, {time_to_close_bucket_sql("microseconds")} AS bucket, microseconds, delta FROM (
            SELECT (closed_at AT TIME ZONE 'UTC')::date AS day,
                {microseconds_to_close_sql("postgresql", "closed_at", "date_created")} AS microseconds, delta
            FROM changes WHERE closed_at IS NOT NULL
        ) AS spans"""
_POSTGRESQL_FIGURES_UPSERTS = (
    """INSERT INTO task_day_counts AS counts (kind, day, status, n)
        SELECT kind, day, status, sum(delta) FROM (
            SELECT 'created' AS kind, status, (date_created AT TIME ZONE 'UTC')::date AS day, delta FROM changes
            UNION ALL
            SELECT 'due', status, (task_time AT TIME ZONE 'UTC')::date, delta FROM changes WHERE status = 'open'
            UNION ALL
            SELECT 'closed', status, (closed_at AT TIME ZONE 'UTC')::date, delta
            FROM changes WHERE closed_at IS NOT NULL
        ) AS days
        GROUP BY kind, day, status HAVING sum(delta) <> 0 ORDER BY kind, day, status
        ON CONFLICT (kind, day, status) DO UPDATE SET n = counts.n + excluded.n""",
    """INSERT INTO time_to_close_counts AS counts (day, bucket, n)
        SELECT day, bucket, sum(delta) FROM closings
        GROUP BY day, bucket HAVING sum(delta) <> 0 ORDER BY day, bucket
        ON CONFLICT (day, bucket) DO UPDATE SET n = counts.n + excluded.n""",
    """INSERT INTO times_to_close AS counts (bucket, day, microseconds, n)
        SELECT bucket, day, microseconds, sum(delta) FROM closings
        GROUP BY bucket, day, microseconds HAVING sum(delta) <> 0 ORDER BY bucket, day, microseconds
        ON CONFLICT (bucket, day, microseconds) DO UPDATE SET n = counts.n + excluded.n""",
)


def _postgresql_figures_branch(operation: str) -> str:
    changes = _POSTGRESQL_FIGURES_CHANGES[operation]
    return "".join(
        f"""
        WITH changes AS (
            {changes}
        ), closings AS (
        {_POSTGRESQL_CLOSINGS}
        )
        {upsert};"""
        for upsert in _POSTGRESQL_FIGURES_UPSERTS
    )


TASK_FIGURES_POSTGRESQL = (
    f"""CREATE OR REPLACE FUNCTION task_figures_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN{_postgresql_figures_branch("INSERT")}
    ELSIF TG_OP = 'DELETE' THEN{_postgresql_figures_branch("DELETE")}
    ELSIF TG_OP = 'UPDATE' THEN{_postgresql_figures_branch("UPDATE")}
    ELSE
        TRUNCATE task_day_counts, time_to_close_counts, times_to_close;  -- TRUNCATE tasks
    END IF;
    RETURN NULL;
END
$$""",
    """CREATE TRIGGER task_figures_insert AFTER INSERT ON tasks REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_figures_apply()""",
    """CREATE TRIGGER task_figures_update AFTER UPDATE ON tasks REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_figures_apply()""",
    """CREATE TRIGGER task_figures_delete AFTER DELETE ON tasks REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_figures_apply()""",
    """CREATE TRIGGER task_figures_truncate AFTER TRUNCATE ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION task_figures_apply()""",
)


def _sqlite_figures(row: str, delta: str) -> str:
    """The row triggers' upserts that count ``row`` (NEW or OLD) ``delta`` (1 or -1) times, if it is live. SQLite
    has one writer at a time: no order to keep. (Each SELECT ends in a WHERE, which SQLite's upsert needs.)"""
    live = f"{row}.deleted_at IS NULL"
    spans = (
        f"(SELECT substr({row}.closed_at, 1, 10) AS day, "
        f"{microseconds_to_close_sql('sqlite', f'{row}.closed_at', f'{row}.date_created')} AS microseconds)"
    )
    bucket = time_to_close_bucket_sql("microseconds")
    return f"""
    INSERT INTO task_day_counts (kind, status, day, n)
    SELECT 'created', {row}.status, substr({row}.date_created, 1, 10), {delta} WHERE {live}
    UNION ALL
    SELECT 'due', {row}.status, substr({row}.task_time, 1, 10), {delta} WHERE {live} AND {row}.status = 'open'
    UNION ALL
    SELECT 'closed', {row}.status, substr({row}.closed_at, 1, 10), {delta} WHERE {live} AND {row}.closed_at IS NOT NULL
    ON CONFLICT (kind, day, status) DO UPDATE SET n = n + excluded.n;
    INSERT INTO time_to_close_counts (day, bucket, n)
    SELECT day, {bucket}, {delta} FROM {spans} WHERE {live} AND {row}.closed_at IS NOT NULL
    ON CONFLICT (day, bucket) DO UPDATE SET n = n + excluded.n;
    INSERT INTO times_to_close (bucket, day, microseconds, n)
    SELECT {bucket}, day, microseconds, {delta} FROM {spans} WHERE {live} AND {row}.closed_at IS NOT NULL
    ON CONFLICT (bucket, day, microseconds) DO UPDATE SET n = n + excluded.n;"""


TASK_FIGURES_SQLITE = (
    f"CREATE TRIGGER task_figures_insert AFTER INSERT ON tasks BEGIN{_sqlite_figures('NEW', '1')}\nEND",
    f"""CREATE TRIGGER task_figures_update AFTER UPDATE OF date_created, task_time, status, closed_at, deleted_at
    ON tasks
    WHEN OLD.date_created IS NOT NEW.date_created OR OLD.task_time IS NOT NEW.task_time
        OR OLD.status IS NOT NEW.status OR OLD.closed_at IS NOT NEW.closed_at
        OR (OLD.deleted_at IS NULL) IS NOT (NEW.deleted_at IS NULL)
    BEGIN{_sqlite_figures("OLD", "-1")}{_sqlite_figures("NEW", "1")}\nEND""",
    f"CREATE TRIGGER task_figures_delete AFTER DELETE ON tasks BEGIN{_sqlite_figures('OLD', '-1')}\nEND",
)

# DDL() formats its statement with %: the '%s' of SQLite's strftime is written '%%s' for it.
for _statement in TASK_FIGURES_POSTGRESQL:
    event.listen(db.metadata, "after_create", DDL(_statement).execute_if(dialect="postgresql"))
for _statement in TASK_FIGURES_SQLITE:
    event.listen(db.metadata, "after_create", DDL(_statement.replace("%", "%%")).execute_if(dialect="sqlite"))
event.listen(
    db.metadata, "after_drop", DDL("DROP FUNCTION IF EXISTS task_figures_apply()").execute_if(dialect="postgresql")
)


class LoginSession(db.Model):
    """One login and the tokens refreshed from it (a token family): its refresh token rotates at every refresh."""

    __tablename__ = "login_sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("app_users.id", ondelete="CASCADE"), index=True)
    refresh_jti: Mapped[str] = mapped_column(String(36))  # the one refresh token of this login still usable
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)  # its refresh token's expiry: purged after it

    def __repr__(self) -> str:
        return f"<LoginSession {self.id} of {self.user_id}>"


class RevokedToken(db.Model):
    """The blocklist: a token's ``jti``, or a login session's id to revoke every token of that session.
    Rows are useless once ``expires_at`` (the tokens' own expiry) has passed; ``flask purge-tokens`` removes them."""

    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(String(36), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    revoked_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"<RevokedToken {self.jti}>"


TASK_EVENT_ACTIONS = ("created", "updated", "status_changed", "bulk_status_changed", "deleted", "restored", "purged")


class TaskEvent(db.Model):
    """The audit trail: one row per change to a task, written in the transaction of the change, never altered.

    An update writes one row per field it changed, with the old and the new value as JSON. No foreign keys: the
    trail outlives a purged task and a deleted user (``actor_id`` stays, ``actor`` becomes null)."""

    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    task_id: Mapped[uuid.UUID] = mapped_column()
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow)
    actor_id: Mapped[uuid.UUID | None] = mapped_column()
    action: Mapped[str] = mapped_column(String(20))
    field: Mapped[str | None] = mapped_column(String(50))
    old_value: Mapped[Any] = mapped_column(JSON, nullable=True)
    new_value: Mapped[Any] = mapped_column(JSON, nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(128))

    actor: Mapped[User | None] = relationship(
        primaryjoin=lambda: foreign(TaskEvent.actor_id) == User.id, lazy="joined", viewonly=True
    )

    __table_args__ = (
        CheckConstraint(f"action IN {TASK_EVENT_ACTIONS}", name="action"),
        Index("ix_task_events_task_id_id", "task_id", "id"),  # a task's history, in order
    )

    def __repr__(self) -> str:
        return f"<TaskEvent {self.id} {self.action} {self.field or ''} of {self.task_id}>"


# The trail is append-only in the database too, not only in the API: an UPDATE or DELETE of an event fails.
TASK_EVENTS_APPEND_ONLY_POSTGRESQL = (
    """CREATE OR REPLACE FUNCTION task_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = 'task_events is append-only: ' || TG_OP || ' is not allowed';
END
$$""",
    """CREATE TRIGGER task_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON task_events
    FOR EACH STATEMENT EXECUTE FUNCTION task_events_append_only()""",
)
TASK_EVENTS_APPEND_ONLY_SQLITE = (
    """CREATE TRIGGER task_events_no_update BEFORE UPDATE ON task_events
    BEGIN SELECT RAISE(ABORT, 'task_events is append-only: UPDATE is not allowed'); END""",
    """CREATE TRIGGER task_events_no_delete BEFORE DELETE ON task_events
    BEGIN SELECT RAISE(ABORT, 'task_events is append-only: DELETE is not allowed'); END""",
)
for _statement in TASK_EVENTS_APPEND_ONLY_POSTGRESQL:
    event.listen(TaskEvent.__table__, "after_create", DDL(_statement).execute_if(dialect="postgresql"))
for _statement in TASK_EVENTS_APPEND_ONLY_SQLITE:
    event.listen(TaskEvent.__table__, "after_create", DDL(_statement).execute_if(dialect="sqlite"))
event.listen(
    db.metadata,
    "after_drop",
    DDL("DROP FUNCTION IF EXISTS task_events_append_only()").execute_if(dialect="postgresql"),
)


class IdempotencyKey(db.Model):
    """An ``Idempotency-Key`` a user sent with a write, and the response its first success got, for 24 hours.

    The row is inserted before the write and holds its response when the write commits, in the same
    transaction: a retry finds either nothing (the first attempt failed, so the retry runs) or the response."""

    __tablename__ = "idempotency_keys"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("app_users.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))  # the method, path and JSON body it was first sent with
    status_code: Mapped[int | None] = mapped_column()
    response: Mapped[Any] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)

    def __repr__(self) -> str:
        return f"<IdempotencyKey {self.key!r} of {self.user_id}>"


OUTBOX_STATES = ("pending", "sending", "sent", "failed")


class OutboxMessage(db.Model):
    """Something that must go out (an email; webhooks later), written in the transaction of the change that caused
    it: the transactional outbox (outbox.py). Nothing is lost, since the row commits or rolls back with its cause;
    nothing goes out twice, since a sender claims the row before sending and ``event_key`` admits one message per
    recipient for one event.

    A claimed row is ``sending`` with ``next_attempt_at`` at the end of its lease: a sender that dies mid-send frees
    it then. So one index serves every sweep: rows ``pending`` or ``sending`` whose ``next_attempt_at`` has passed
    are due."""

    __tablename__ = "outbox_messages"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(40))  # what to send, e.g. the mail template's name
    recipient: Mapped[str] = mapped_column(String(320))
    event_key: Mapped[str] = mapped_column(String(160))  # the event that caused it, e.g. "password-reset:<token id>"
    payload: Mapped[Any] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(10), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column()
    sent_at: Mapped[datetime | None] = mapped_column(index=True)  # /metrics: the delivery times of the last minutes
    handed_over_at: Mapped[datetime | None] = mapped_column()  # last handed to a sender (the broker): outbox.due

    __table_args__ = (
        CheckConstraint(f"state IN {OUTBOX_STATES}", name="state"),
        UniqueConstraint("event_key", "recipient"),
        Index(
            "ix_outbox_messages_due",
            "next_attempt_at",
            "id",
            postgresql_where=text("state IN ('pending', 'sending')"),
            sqlite_where=text("state IN ('pending', 'sending')"),
        ),
        Index("ix_outbox_messages_state_created_at", "state", "created_at"),  # the administrators' list, by state
    )

    def __repr__(self) -> str:
        return f"<OutboxMessage {self.id} {self.kind} to {self.recipient}: {self.state}>"


TOKEN_PURPOSES = ("password_reset", "invitation", "email_verification", "email_change")


class OneTimeToken(db.Model):
    """A link sent by email that works once: a password reset, an invitation, an address's verification, a new
    address's confirmation. Only the SHA-256 of the random token is stored, so the table's contents open nothing; a
    token dies when used (``used_at``), revoked (``revoked_at``) or past ``expires_at``.

    ``email`` is the address the link went to (the invitee's, the new address); ``user_id`` the account it acts on
    (none for an invitation); ``created_by_id`` who asked for it (the inviting administrator)."""

    __tablename__ = "one_time_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    purpose: Mapped[str] = mapped_column(String(20))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str] = mapped_column(String(255))
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("app_users.id", ondelete="CASCADE"), index=True)
    created_by_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("app_users.id", ondelete="SET NULL"))
    data: Mapped[Any] = mapped_column(JSON, nullable=True)  # what the purpose needs besides, e.g. an invitee's role
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        CheckConstraint(f"purpose IN {TOKEN_PURPOSES}", name="purpose"),
        Index("ix_one_time_tokens_purpose_email", "purpose", "email"),  # an address's invitations, its resends
    )

    def __repr__(self) -> str:
        return f"<OneTimeToken {self.id} {self.purpose} for {self.email}>"
