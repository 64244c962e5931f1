"""The dashboard's figures: one statement over the task counts the database keeps and a few short index ranges
(tasks due from now on, tasks created or closed lately), never a scan of all the tasks."""

from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from itertools import pairwise

from flask import Blueprint
from sqlalchemy import Float, String, Uuid, bindparam, case, extract, func, literal, null, or_, select, union_all

from models import Task, User, db, task_counts, utcnow
from routes import load_args, require_login
from routes.tasks import COUNTED_FILTERS, FILTERS, task_filters
from schemas import DashboardSchema, TaskFilterSchema

bp = Blueprint("analytics", __name__, url_prefix="/api/analytics")
bp.before_request(require_login)
dashboard_schema = DashboardSchema()

UNASSIGNED = "Unassigned"
WEEKS = 12
# The median time to close is over the tasks closed in this window: all time would sort half a million rows.
MEDIAN_WINDOW = timedelta(days=30)
# Just above a half: percentile_disc of it is the upper middle value (see median_to_close).
UPPER_MIDDLE = 0.500000001
# Filters under which the time-based figures stay COUNTs of index ranges (see dashboard_statement).
RANGED_FILTERS = frozenset(("status", "created_from", "created_before"))
NO_TEXT = null().cast(String())
NO_USER = null().cast(Uuid())
NO_SECONDS = null().cast(Float())
AFTER_ALL = datetime.max.replace(tzinfo=UTC)
# The statement's moments, bound per request (see moments): the due ranges start at now, midnight and week_ahead;
# the weeks at week_0 ... week_11 (week_12: the next Monday); closings are counted between closing_0 ... closing_14,
# the week starts and the starts of the 7- and 30-day windows in order, so that each range lies in one week (or
# after the last) and wholly inside or outside each window.
DUE = ["now", "midnight", "week_ahead"]
WEEK = [f"week_{n}" for n in range(WEEKS + 1)]
CLOSING = [f"closing_{n}" for n in range(WEEKS + 3)]


def week_starts(now: datetime) -> list[datetime]:
    """Monday 00:00 UTC of each of the last ``WEEKS`` weeks (the current one last), and of the next week."""
    monday = datetime.combine(now.date() - timedelta(days=now.weekday()), time.min, tzinfo=UTC)
    return [monday - timedelta(weeks=WEEKS - 1 - n) for n in range(WEEKS + 1)]


def moments(now: datetime) -> dict[str, datetime]:
    """The values of the statement's bound moments (``DUE``, ``WEEK``, ``CLOSING``, month_ago) as of ``now``, and
    week_ago (which only the sums in Python need)."""
    weeks = week_starts(now)
    week_ago, month_ago = now - timedelta(days=7), now - MEDIAN_WINDOW
    midnight = datetime.combine(now.date() + timedelta(days=1), time.min, tzinfo=UTC)
    return {
        **dict(zip(DUE, [now, midnight, now + timedelta(days=7)], strict=True)),
        **dict(zip(WEEK, weeks, strict=True)),
        **dict(zip(CLOSING, sorted([*weeks, week_ago, month_ago]), strict=True)),
        "week_ago": week_ago,
        "month_ago": month_ago,
    }


def moment(name: str):
    """The statement's bound moment ``name`` (see ``moments``)."""
    return bindparam(name, type_=Task.date_created.type)


def span_to_close(dialect: str, closed_at, date_created):
    """``closed_at - date_created``, as it sorts by length: PostgreSQL's interval (exact, and cheaper to sort than
    its seconds); on SQLite the seconds, exact to the microsecond. SQLite keeps timestamps as text
    ('2025-01-15 10:00:00.123456') and its date functions round to the millisecond: the whole seconds come from
    strftime('%s') of the first 19 characters, the fraction from the digits after them."""
    if dialect != "sqlite":
        return closed_at - date_created

    def whole(column):
        return func.strftime("%s", func.substr(column, 1, 19)).cast(Float())

    def fraction(column):
        return func.substr(column, 20).cast(Float())

    return (whole(closed_at) - whole(date_created)) + (fraction(closed_at) - fraction(date_created))


def seconds_of(dialect: str, span):
    """A ``span_to_close`` in seconds: PostgreSQL's interval as exactly as ``timedelta.total_seconds()`` does it."""
    return span if dialect == "sqlite" else extract("epoch", span).cast(Float())


def median_to_close(dialect: str, closed_at, date_created, conditions: list):
    """One row: the median time to close of the tasks ``conditions`` select, in seconds (null if none). Of an even
    number, the mean of the middle two, as ``statistics.median`` takes it.

    PostgreSQL: the middle two are percentile_disc(0.5) (position ceil(n / 2)) and percentile_disc(UPPER_MIDDLE)
    (position floor(n / 2) + 1 for any n below 500 million), which share one sort; they are values, not
    percentile_cont's interpolation, so their mean is exact. SQLite has no percentile functions: the rows are
    numbered in order and the middle one or two kept."""
    span = span_to_close(dialect, closed_at, date_created)
    if dialect != "sqlite":
        lower = func.percentile_disc(0.5).within_group(span)
        upper = func.percentile_disc(UPPER_MIDDLE).within_group(span)
        median = (seconds_of(dialect, lower) + seconds_of(dialect, upper)) / 2.0
        return select(literal("median"), NO_TEXT, NO_USER, func.count(), median).where(*conditions)
    ranked = select(
        span.label("seconds"),
        func.row_number().over(order_by=span).label("position"),
        func.count().over().label("closings"),
    )
    ranked = ranked.where(*conditions).subquery("closings")
    position, closings = 2 * ranked.c.position, ranked.c.closings
    middle = (position >= closings) & (position <= closings + 2)
    return select(literal("median"), NO_TEXT, NO_USER, func.count(), func.avg(ranked.c.seconds)).where(middle)


def counted_between(kind: str, column, bounds: list[str], conditions: list, until: str | None = None) -> list:
    """Rows (kind, n as text, count) of the tasks ``conditions`` select whose ``column`` lies from the moment
    ``bounds[n]`` (inclusive) to the next one (exclusive; ``until`` after the last, or no end at all without one,
    so that a time as late as 9999-12-31T23:59:59.999999Z counts too). A COUNT of an index range per bound, in a
    correlated subquery: several times cheaper than grouping the same rows by a CASE."""
    starts = [moment(name) for name in bounds]
    ends = [*starts[1:], moment(until)] if until else starts[1:]  # without until, the last start has no end
    ranges = union_all(
        *[
            select(literal(str(n)).label("label"), start.label("since"), end.label("until"))
            for n, (start, end) in enumerate(zip(starts[: len(ends)], ends, strict=True))
        ]
    ).subquery(f"{kind}_ranges")
    count = select(func.count()).where(*conditions, column >= ranges.c.since, column < ranges.c.until)
    rows = [select(literal(kind), ranges.c.label, NO_USER, count.scalar_subquery(), NO_SECONDS)]
    if not until:
        last = select(func.count()).where(*conditions, column >= starts[-1]).scalar_subquery()
        rows.append(select(literal(kind), literal(str(len(bounds) - 1)), NO_USER, last, NO_SECONDS))
    return rows


def grouped_between(kind: str, column, bounds: list[str], conditions: list, until: str | None = None) -> list:
    """The rows of ``counted_between`` from one pass over rows a filter has picked out already, grouped by a CASE
    (where a COUNT per range would redo the filter's work for each range)."""
    label = case(*[(column >= moment(name), str(n)) for n, name in reversed(list(enumerate(bounds)))]).label("label")
    return [
        select(literal(kind), label, NO_USER, func.count(), NO_SECONDS)
        .where(*conditions, column >= moment(bounds[0]), *([column < moment(until)] if until else []))
        .group_by(label)
    ]


def counts_source(args: dict):
    """The per (status, type, assignee) totals to read the summary, types and assignees from: the kept counts when
    the filters are ones they can answer (always, unfiltered), else the filtered tasks grouped alike."""
    if COUNTED_FILTERS.issuperset(name for name in FILTERS if name in args):
        return task_counts, task_filters(args, task_counts.c)
    grouped = (
        select(Task.status, Task.task_type, Task.contact_person_id, func.count().label("n"))
        .where(*task_filters(args))
        .group_by(Task.status, Task.task_type, Task.contact_person_id)
        .cte("filtered_counts")
    )
    return grouped, []


@lru_cache(maxsize=64)
def dashboard_statement(dialect: str, filters: tuple):
    """The dashboard's statement for these filters (``args`` items), with its moments as bound parameters: built
    and compiled once, then reused at every request with the same filters.

    Unfiltered, or filtered by status and dates only, the time-based figures are COUNTs of index ranges (one per
    week, see ``counted_between``). Other filters pick their rows out once (the tasks created, closed or due in the
    period, in a CTE), which are then grouped (``grouped_between``). A status filter leaves out what it rules out:
    closed figures for open tasks, due figures for closed ones."""
    args = dict(filters)
    with_due, with_closed = args.get("status") != "closed", args.get("status") != "open"
    if set(args) <= RANGED_FILTERS:
        between, tasks, conditions = counted_between, Task, task_filters(args)
        # closed_at is set exactly on closed tasks (a check constraint): a status adds nothing to closed_at >= ...,
        # and leaving it out keeps those counts inside the index.
        closing_conditions = task_filters({name: value for name, value in args.items() if name != "status"})
    else:
        picked = [
            Task.date_created >= moment(WEEK[0]),
            *([Task.closed_at >= moment(CLOSING[0])] if with_closed else []),
            *([(Task.status == "open") & (Task.task_time >= moment(DUE[0]))] if with_due else []),
        ]
        tasks = (
            select(Task.date_created, Task.closed_at, Task.task_time, Task.status)
            .where(*task_filters(args), or_(*picked))
            .cte("picked_tasks")
            .c
        )
        between, conditions, closing_conditions = grouped_between, [], []

    source, where = counts_source(args)
    counts = source.c
    total = func.sum(counts.n)
    selects = [
        select(literal("status"), counts.status, NO_USER, total, NO_SECONDS).where(*where).group_by(counts.status),
        select(literal("type"), counts.task_type, NO_USER, total, NO_SECONDS)
        .where(*where)
        .group_by(counts.task_type)
        .having(total > 0),
        select(literal("user"), User.full_name, counts.contact_person_id, total, NO_SECONDS)
        .select_from(source)
        .outerjoin(User, User.id == counts.contact_person_id)
        .where(*where)
        .group_by(counts.contact_person_id, User.full_name)
        .having(total > 0),
        *between("created", tasks.date_created, WEEK[:-1], conditions, until=WEEK[-1]),
    ]
    if with_due:
        selects += between("due", tasks.task_time, DUE, [*conditions, tasks.status == "open"])
    if with_closed:
        recently = [*closing_conditions, tasks.closed_at >= moment("month_ago")]
        selects += between("closed", tasks.closed_at, CLOSING, closing_conditions)
        selects.append(median_to_close(dialect, tasks.closed_at, tasks.date_created, recently))
    return union_all(*selects)


def dashboard_figures(args: dict | None = None, now: datetime | None = None) -> dict:
    """Every figure of the dashboard for the tasks the list's filters (``TaskFilterSchema``) select, as of ``now``
    (UTC), in one statement (``dashboard_statement``). Deleted tasks never count.

    - summary, task_types, user_tasks: from ``task_counts`` (a few rows, kept exact by triggers) when the filters
      are status, type and assignee only, else from the filtered tasks. Tasks whose assignee was deleted count
      as "Unassigned".
    - due: open tasks by due time. overdue: task_time < now; today: now <= task_time < the next UTC midnight;
      next_7_days: now <= task_time < now + 7 days (so it includes today's). Only the few open tasks due from now
      on are counted (from the partial index of open tasks by due time): overdue is the open total less them.
    - closed: last_7_days / last_30_days: closed_at >= now - 7 / 30 days. median_seconds_to_close: the median of
      closed_at - date_created over the tasks closed in the last 30 days (all time would sort half a million rows
      at a million tasks); of an even number, the mean of the middle two; null when none was closed.
    - weekly: the last 12 weeks, oldest first, each from Monday 00:00 UTC; the last is the current, partial week.
      created: tasks created in that week; closed: tasks (closed now) whose closed_at falls in that week.
    """
    args = args or {}
    at = moments(now or utcnow())
    statement = dashboard_statement(db.session.get_bind().dialect.name, tuple(sorted(args.items())))
    rows = db.session.execute(statement, at).all()

    by_status, task_types, assignees, figures, median = {}, [], [], {}, None
    for kind, label, user_id, n, value in rows:
        if kind == "status":
            by_status[label] = int(n)
        elif kind == "type":
            task_types.append((label, int(n)))
        elif kind == "user":
            assignees.append((label, user_id, int(n)))
        elif kind == "median":
            median = None if value is None else float(value)
        else:
            figures[kind, int(label)] = int(n)
    # Most first; ties by name, "Unassigned" after the people.
    task_types.sort(key=lambda row: (-row[1], row[0]))
    assignees.sort(key=lambda row: (-row[2], row[0] is None, row[0] or ""))
    open_tasks = by_status.get("open", 0)
    today, this_week, later = (figures.get(("due", n), 0) for n in range(len(DUE)))

    def closings(start: datetime, end: datetime = AFTER_ALL) -> int:
        return sum(figures.get(("closed", n), 0) for n, name in enumerate(CLOSING) if start <= at[name] < end)

    return {
        "as_of": at["now"],
        "summary": {
            "total_tasks": sum(by_status.values()),
            "open_tasks": open_tasks,
            "closed_tasks": by_status.get("closed", 0),
        },
        "task_types": [{"type": task_type, "count": n} for task_type, n in task_types],
        "user_tasks": [
            {"user": full_name or UNASSIGNED, "user_id": user_id, "count": n} for full_name, user_id, n in assignees
        ],
        "due": {"overdue": open_tasks - today - this_week - later, "today": today, "next_7_days": today + this_week},
        "closed": {
            "last_7_days": closings(at["week_ago"]),
            "last_30_days": closings(at["month_ago"]),
            "median_seconds_to_close": median,
        },
        "weekly": [
            {
                "week_start": at[start].date(),
                "created": figures.get(("created", n), 0),
                "closed": closings(at[start], at[end]),
            }
            for n, (start, end) in enumerate(pairwise(WEEK))
        ],
    }


@bp.get("/dashboard")
def dashboard():
    """Counts by status, type and assignee, what is due, what was closed and how fast, and the last 12 weeks.

    Every figure counts the tasks the list's filters select (deleted tasks never count), as of one moment, given
    as as_of; all of it in UTC. due: open tasks overdue (task_time before as_of), due before the next UTC
    midnight, and due in the next 7 days (today's included). closed: tasks closed in the last 7 and 30 days, and
    the median time from creation to closing of those closed in the last 30 days (null if none). weekly: tasks
    created and closed in each of the last 12 weeks (Monday 00:00 UTC on), oldest first, the current week last.
    ---
    parameters: [{in: query, schema: TaskFilterSchema}]
    responses:
      200: {description: The dashboard., content: {application/json: {schema: DashboardSchema}}}
      400: {$ref: "#/components/responses/BadRequest"}
    """
    return dashboard_schema.dump(dashboard_figures(load_args(TaskFilterSchema())))
