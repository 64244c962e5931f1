"""The task list for spreadsheets and filter drop-downs: a streamed CSV export, and the filters' facets."""

import csv
import io
import logging
from collections import Counter
from collections.abc import Iterator
from itertools import chain

from flask import Blueprint, Response, stream_with_context
from sqlalchemy import Integer, String, Text, Uuid, cast, func, literal, null, select, type_coerce, union_all
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import aliased

from models import Task, User, UTCDateTime, db, entity_name_counts, task_counts, utcnow
from routes import load_args, require_login, still_working
from routes.analytics import UNASSIGNED
from routes.tasks import COUNTED_FILTERS, FILTERS, after_cursor, sort_key, task_filters
from schemas import ExportQuerySchema, FacetQuerySchema

bp = Blueprint("task_export", __name__, url_prefix="/api/tasks")
bp.before_request(require_login)
logger = logging.getLogger(__name__)

# Rows per SELECT of the export, each in a transaction of its own: a few milliseconds each, whatever the total.
BATCH_SIZE = 1000
# U+FEFF, UTF-8's byte-order mark: how Excel tells a UTF-8 CSV file from one in the system's legacy code page.
BYTE_ORDER_MARK = "\ufeff"
# What spreadsheets read as the start of a formula (OWASP's list): such cells get a leading quote.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

contact, creator, closer = aliased(User, name="contact"), aliased(User, name="creator"), aliased(User, name="closer")
EXPORT_COLUMNS = (
    Task.id,
    Task.date_created,
    Task.entity_name,
    Task.task_type,
    Task.task_time,
    Task.status,
    Task.contact_person_id,
    contact.full_name.label("contact_person"),
    Task.note,
    Task.created_by_id,
    creator.full_name.label("created_by"),
    Task.closed_at,
    Task.closed_by_id,
    closer.full_name.label("closed_by"),
    Task.updated_at,
    Task.version,
)
HEADER = tuple(column.key for column in EXPORT_COLUMNS)
TEXT_CELLS = tuple(index for index, column in enumerate(EXPORT_COLUMNS) if isinstance(column.type, String))


def uuid_text(column, dialect: str):
    """An id as the API writes it (8-4-4-4-12 hex digits), written by the database."""
    if dialect == "postgresql":
        return cast(column, Text)
    digits = type_coerce(column, String())  # SQLite keeps the 32 hex digits
    text = func.substr(digits, 1, 8, type_=String())
    for start, length in ((9, 4), (13, 4), (17, 4), (21, 12)):
        text = text.concat("-").concat(func.substr(digits, start, length, type_=String()))
    return text


def timestamp_text(column, dialect: str):
    """A timestamp as the API writes it (Python's isoformat: microseconds only when there are some, then the UTC
    offset), written by the database."""
    if dialect == "postgresql":
        text = func.to_char(func.timezone("UTC", column), 'YYYY-MM-DD"T"HH24:MI:SS.US', type_=String())
    else:  # SQLite keeps UTC as 2025-01-15 10:00:00.000000
        text = func.replace(type_coerce(column, String()), " ", "T", type_=String())
    return func.replace(text, ".000000", "", type_=String()).concat("+00:00")


def export_column(column, dialect: str):
    """``column`` of ``EXPORT_COLUMNS`` as the export selects it."""
    if isinstance(column.type, Uuid):
        return uuid_text(column, dialect).label(column.key)
    if isinstance(column.type, UTCDateTime):
        return timestamp_text(column, dialect).label(column.key)
    return column


def export_select():
    """The export's columns and the people's names, in one statement. Ids and timestamps come as the text the
    CSV shows: parsed into UUIDs and datetimes only to be printed again, they took half of the export's time
    (three quarters under tracemalloc, on SQLite)."""
    dialect = db.session.get_bind().dialect.name
    return (
        select(*(export_column(column, dialect) for column in EXPORT_COLUMNS))
        .select_from(Task)
        .outerjoin(contact, contact.id == Task.contact_person_id)
        .outerjoin(creator, creator.id == Task.created_by_id)
        .outerjoin(closer, closer.id == Task.closed_by_id)
    )


def csv_row(row) -> list:
    """A row with the text that a spreadsheet would run as a formula quoted by a leading ``'``. Only text can start
    so: ids, timestamps and numbers start with a hex digit."""
    cells = list(row)
    for index in TEXT_CELLS:
        value = cells[index]
        if value and value.startswith(FORMULA_STARTS):
            cells[index] = "'" + value
    return cells


def export_batches(args: dict) -> Iterator[list]:
    """The rows the filters select, in the list's order, ``BATCH_SIZE`` at a time by keyset: each SELECT starts
    after the last row of the one before and is committed before its rows are handed on, so no transaction (on
    SQLite: no write lock) lasts longer than one batch, and a slow client holds none."""
    sort_by = args["sort_by"]
    descending = args["sort_order"] == "desc"
    order = [key.desc() if descending else key.asc() for key in sort_key(sort_by)]
    stmt = export_select().where(*task_filters(args)).order_by(*order).limit(BATCH_SIZE)
    batch = stmt
    while True:
        rows = db.session.execute(batch).all()
        db.session.commit()
        yield rows
        if len(rows) < BATCH_SIZE:
            return
        last = rows[-1]
        batch = stmt.where(after_cursor(args, [getattr(last, sort_by), last.id]))  # timestamps as ISO 8601 text


def csv_chunks(first: list, rest: Iterator[list], bom: bool = False) -> Iterator[str]:
    """The CSV text, a chunk per batch, the header row (after a byte-order mark, with ``bom``) with the first. A
    database failure once the answer has started is logged, and breaks the download off."""
    buffer = io.StringIO(BYTE_ORDER_MARK if bom else "")
    buffer.seek(0, io.SEEK_END)
    writer = csv.writer(buffer)
    writer.writerow(HEADER)
    written = 0
    try:
        for rows in chain([first], rest):
            writer.writerows(map(csv_row, rows))
            written += len(rows)
            if buffer.tell():  # the last batch may be empty
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
            still_working()  # a sync worker streaming a big export is busy, not stuck
    except SQLAlchemyError:
        # Raised on, so that the server drops the connection without the chunked body's last chunk: the client
        # sees a failed download, not a file that looks whole.
        logger.exception("The task export failed after %d rows; the file sent is incomplete.", written)
        db.session.rollback()
        raise


@bp.get("/export.csv")
def export_tasks():
    """The task list as a CSV file, filtered and sorted as the list is, every page of it.

    One row per task, with a header row: id, date_created, entity_name, task_type, task_time, status,
    contact_person_id, contact_person, note, created_by_id, created_by, closed_at, closed_by_id, closed_by,
    updated_at, version. People are their full names (and ids); timestamps ISO 8601 with their offset, as the
    JSON API shows them; an empty cell is null. A cell that a spreadsheet would take for a formula (starting
    with =, +, -, @, a tab or a carriage return) starts with a single quote. Streamed, a thousand rows at a
    time, however many there are; a bad parameter is a 400 before anything is sent. UTF-8, with a byte-order mark
    first when ``bom=true`` (for Excel).
    ---
    tags: [tasks]
    parameters: [{in: query, schema: ExportQuerySchema}]
    responses:
      200:
        description: The tasks, as an attachment named tasks-<UTC date>.csv.
        headers:
          Content-Disposition:
            description: attachment; filename="tasks-2025-01-15.csv"
            schema: {type: string}
        content: {text/csv: {schema: {type: string}}}
      400: {$ref: "#/components/responses/BadRequest"}
    """
    args = load_args(ExportQuerySchema())
    bom = args.pop("bom")
    batches = export_batches(args)
    first = next(batches)  # here, so that a database out of reach is still a 503, not a 200 cut short
    response = Response(stream_with_context(csv_chunks(first, batches, bom)), mimetype="text/csv")
    response.headers["Content-Disposition"] = f'attachment; filename="tasks-{utcnow().date().isoformat()}.csv"'
    response.headers["Cache-Control"] = "no-store"
    return response


def binary_order(column):
    """``column`` compared by code point, as Python compares strings: SQLite's default, PostgreSQL's "C"."""
    return column.collate("C") if db.session.get_bind().dialect.name == "postgresql" else column


def facet_rows(args: dict, limit: int) -> list:
    """The counts of the tasks the filters select per (task type, assignee), and of the ``limit`` most used entity
    names with how many there are, in one statement of two groupings.

    Types and assignees are summed from the (type, assignee) pairs, a few hundred at most: from ``task_counts``
    when no filter but those it answers is given, else from the tasks. Entity names likewise from
    ``entity_name_counts`` (a row per name and status) when no filter but the status is given; other filters need a
    GROUP BY over the tasks they select (unfiltered, at a million tasks on PostgreSQL, a parallel scan of 360 ms)."""
    conditions = task_filters(args)
    if COUNTED_FILTERS.issuperset(name for name in FILTERS if name in args):
        counts = task_counts.c
        n = func.sum(counts.n)
        pairs = (
            select(counts.task_type, counts.contact_person_id, n.label("n"))
            .where(*task_filters(args, counts))
            .group_by(counts.task_type, counts.contact_person_id)
            .having(n > 0)  # a counter emptied by deletes stays, at 0
        )
    else:
        pairs = (
            select(Task.task_type, Task.contact_person_id, func.count().label("n"))
            .where(*conditions)
            .group_by(Task.task_type, Task.contact_person_id)
        )
    pairs = pairs.subquery()
    named_pairs = select(
        literal("pair"), pairs.c.task_type, pairs.c.contact_person_id, User.full_name, pairs.c.n, null().cast(Integer())
    ).outerjoin_from(pairs, User, User.id == pairs.c.contact_person_id)
    if {name for name in FILTERS if name in args} <= {"status"}:
        names = entity_name_counts.c
        used = func.sum(names.n)
        by_name = select(names.entity_name).where(*task_filters(args, names)).having(used > 0)
        name = names.entity_name
    else:
        used = func.count()
        by_name = select(Task.entity_name).where(*conditions)
        name = Task.entity_name
    ranked = (
        by_name.add_columns(used.label("n"), func.count().over().label("total"))
        .group_by(name)
        .order_by(used.desc(), binary_order(name))
        .limit(limit)
        .subquery()
    )
    entities = select(
        literal("entity"), ranked.c.entity_name, null().cast(Uuid()), null().cast(String()), ranked.c.n, ranked.c.total
    )
    return db.session.execute(union_all(named_pairs, entities)).all()


@bp.get("/facets")
def task_facets():
    """The values the list's filters can take, with how many live tasks have each: for filter drop-downs.

    Task types, entity names and assignees of the tasks the filters select (each filter applies to every
    facet), most used first, ties by value (by code point); tasks with no assignee, or whose assignee was
    deleted, count as "Unassigned" (user_id null), after the people. Entity names can be many: the `limit`
    most used come (100 unless asked), and entity_names_total says how many there are. Counts are exact.
    ---
    tags: [tasks]
    parameters: [{in: query, schema: FacetQuerySchema}]
    responses:
      200: {description: The facets., content: {application/json: {schema: FacetsSchema}}}
      400: {$ref: "#/components/responses/BadRequest"}
    """
    args = load_args(FacetQuerySchema())
    limit = args.pop("limit")
    types, people, entities, entity_total = Counter(), Counter(), [], 0
    for kind, value, user_id, full_name, n, total in facet_rows(args, limit):
        if kind == "pair":
            types[value] += int(n)
            people[(full_name, user_id) if full_name is not None else (None, None)] += int(n)  # no such user
        else:
            entities.append({"value": value, "count": int(n)})
            entity_total = int(total)
    entities.sort(key=lambda row: (-row["count"], row["value"]))
    # Most first, ties by value; "Unassigned" after the people, as on the dashboard.
    types = sorted(types.items(), key=lambda item: (-item[1], item[0]))
    assignees = sorted(people.items(), key=lambda item: (-item[1], item[0][0] is None, item[0][0] or "", item[0][1]))
    return {
        "task_types": [{"value": value, "count": count} for value, count in types],
        "entity_names": entities,
        "entity_names_total": entity_total,
        "assignees": [
            {"user_id": str(user_id) if user_id else None, "user": name or UNASSIGNED, "count": count}
            for (name, user_id), count in assignees
        ],
    }
