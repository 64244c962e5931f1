"""The dashboard's figures, in one statement. Unfiltered or by status, from tables the writes keep (task_counts,
task_day_counts, time_to_close_counts, times_to_close) and, where a window starts or ends within a day, that day's
part of an index; under other filters, from COUNTs of index ranges or one pass over the tasks those filters pick."""

import hashlib
import json
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from itertools import pairwise

from flask import Blueprint, jsonify
from sqlalchemy import (
    BigInteger,
    Date,
    String,
    Uuid,
    and_,
    bindparam,
    case,
    cast,
    column,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy.dialects.postgresql import array

from models import (
    Task,
    User,
    db,
    microseconds_to_close_sql,
    task_counts,
    task_day_counts,
    time_to_close_bucket_sql,
    time_to_close_counts,
    times_to_close,
    utcnow,
)
from routes import load_args, require_login, unless_unchanged
from routes.tasks import COUNTED_FILTERS, FILTERS, task_filters
from schemas import DashboardSchema, TaskFilterSchema

bp = Blueprint("analytics", __name__, url_prefix="/api/analytics")
bp.before_request(require_login)
dashboard_schema = DashboardSchema()

UNASSIGNED = "Unassigned"
WEEKS = 12
# The median time to close is over the tasks closed in this window.
MEDIAN_WINDOW = timedelta(days=30)
# Just above a half: percentile_disc of it is the upper middle value (see median_to_close).
UPPER_MIDDLE = 0.500000001
# Filters the kept tables answer (see kept_statement), and those under which the time-based figures are COUNTs of
# index ranges (see dashboard_statement).
KEPT_FILTERS = frozenset(("status",))
RANGED_FILTERS = frozenset(("status", "created_from", "created_before"))
NO_TEXT = null().cast(String())
NO_USER = null().cast(Uuid())
NO_NUMBER = null().cast(BigInteger())
AFTER_ALL = datetime.max.replace(tzinfo=UTC)
DAY = timedelta(days=1)
# The statement's moments, bound per request (see moments). Counting from the tasks: the due ranges start at now,
# midnight and week_ahead; the weeks at week_0 ... week_11 (week_12: the next Monday); closings are counted between
# closing_0 ... closing_14, the week starts and the starts of the 7- and 30-day windows in order, so that each range
# lies in one week (or after the last) and wholly inside or outside each window.
DUE = ["now", "midnight", "week_ahead"]
WEEK = [f"week_{n}" for n in range(WEEKS + 1)]
CLOSING = [f"closing_{n}" for n in range(WEEKS + 3)]
# From the kept tables: the days (first, last, both included) summed per figure, and the kind of count summed.
# A window that starts within a day (7 days ago, 30 days ago, a week from now) takes that day's part from an index
# range instead (see kept_statement), and whole days from the next day on.
DAY_RANGES = {
    **{f"created:{n}": ("created", f"day_{n}", f"last_day_{n}") for n in range(WEEKS)},
    **{f"closed:{n}": ("closed", f"day_{n}", f"last_day_{n}") for n in range(WEEKS)},
    "closed:week": ("closed", "week_ago_next_day", "last_day"),
    "closed:month": ("closed", "month_ago_next_day", "last_day"),
    "due:week": ("due", "tomorrow", "week_ahead_day_before"),
    "due:later": ("due", "week_ahead_day", "last_day"),
}


def week_starts(now: datetime) -> list[datetime]:
    """Monday 00:00 UTC of each of the last ``WEEKS`` weeks (the current one last), and of the next week."""
    monday = datetime.combine(now.date() - timedelta(days=now.weekday()), time.min, tzinfo=UTC)
    return [monday - timedelta(weeks=WEEKS - 1 - n) for n in range(WEEKS + 1)]


def start_of(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def moments(now: datetime) -> dict[str, datetime | date]:
    """The values of the statements' bound moments as of ``now``: timestamps (``DUE``, ``WEEK``, ``CLOSING``,
    month_ago, and the midnights the kept path's index ranges end or start at) and days (``DAY_RANGES``'s); and
    week_ago, which only the sums in Python need."""
    weeks = week_starts(now)
    week_ago, month_ago, week_ahead = now - timedelta(days=7), now - MEDIAN_WINDOW, now + timedelta(days=7)
    midnight = start_of(now.date() + DAY)
    return {
        **dict(zip(DUE, [now, midnight, week_ahead], strict=True)),
        **dict(zip(WEEK, weeks, strict=True)),
        **dict(zip(CLOSING, sorted([*weeks, week_ago, month_ago]), strict=True)),
        "week_ago": week_ago,
        "month_ago": month_ago,
        **{f"day_{n}": start.date() for n, start in enumerate(weeks)},
        **{f"last_day_{n}": end.date() - DAY for n, end in enumerate(weeks[1:])},
        "tomorrow": midnight.date(),
        "week_ahead_day_before": week_ahead.date() - DAY,
        "week_ahead_day": week_ahead.date(),
        "week_ahead_day_start": start_of(week_ahead.date()),
        "week_ago_next_day": week_ago.date() + DAY,
        "week_ago_midnight": start_of(week_ago.date() + DAY),
        "month_ago_next_day": month_ago.date() + DAY,
        "month_ago_midnight": start_of(month_ago.date() + DAY),
        "last_day": date.max,
    }


def moment(name: str):
    """The statement's bound moment ``name`` (see ``moments``)."""
    return bindparam(name, type_=Task.date_created.type)


def day(name: str):
    """The statement's bound day ``name`` (see ``moments``)."""
    return bindparam(name, type_=Date())


def microseconds_to_close(dialect: str, source: str):
    """closed_at - date_created of ``source``'s rows (a table or subquery name), in whole microseconds, exactly:
    the SQL the triggers keep times_to_close with (see models.microseconds_to_close_sql)."""
    sql = microseconds_to_close_sql(dialect, f"{source}.closed_at", f"{source}.date_created")
    return literal_column(sql, BigInteger())


def median_to_close(dialect: str, source: str, conditions: list):
    """Rows ('median', ..., microseconds): the middle time(s) to close of the tasks ``conditions`` select from
    ``source`` (by the tasks' own rows: the filtered paths); none if none was closed. See dashboard_figures.

    PostgreSQL: the middle two are percentile_disc(0.5) (position ceil(n / 2)) and percentile_disc(UPPER_MIDDLE)
    (position floor(n / 2) + 1 for any n below 500 million), from one sort; values, not percentile_cont's
    interpolation. SQLite has no percentile functions: the rows are numbered in order and the middle one or two
    kept."""
    span = microseconds_to_close(dialect, source)
    if dialect != "sqlite":
        middles = func.unnest(func.percentile_disc(array([0.5, UPPER_MIDDLE])).within_group(span))
        return select(literal("median"), NO_TEXT, NO_USER, NO_NUMBER, middles).where(*conditions)
    ranked = select(
        span.label("microseconds"),
        func.row_number().over(order_by=span).label("position"),
        func.count().over().label("closings"),
    )
    ranked = ranked.where(*conditions).subquery("closings")
    position, closings = 2 * ranked.c.position, ranked.c.closings
    middle = (position >= closings) & (position <= closings + 2)
    return select(literal("median"), NO_TEXT, NO_USER, NO_NUMBER, ranked.c.microseconds).where(middle)


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
    rows = [select(literal(kind), ranges.c.label, NO_USER, count.scalar_subquery(), NO_NUMBER)]
    if not until:
        last = select(func.count()).where(*conditions, column >= starts[-1]).scalar_subquery()
        rows.append(select(literal(kind), literal(str(len(bounds) - 1)), NO_USER, last, NO_NUMBER))
    return rows


def grouped_between(kind: str, column, bounds: list[str], conditions: list, until: str | None = None) -> list:
    """The rows of ``counted_between`` from one pass over rows a filter has picked out already, grouped by a CASE
    (where a COUNT per range would redo the filter's work for each range)."""
    label = case(*[(column >= moment(name), str(n)) for n, name in reversed(list(enumerate(bounds)))]).label("label")
    return [
        select(literal(kind), label, NO_USER, func.count(), NO_NUMBER)
        .where(*conditions, column >= moment(bounds[0]), *([column < moment(until)] if until else []))
        .group_by(label)
    ]


def counts_source(args: dict):
    """The per (status, type, assignee) totals to read the summary, types and assignees from, as a CTE (read once,
    grouped three ways): the kept counts when the filters are ones they can answer (always, unfiltered), else the
    filtered tasks grouped alike."""
    if COUNTED_FILTERS.issuperset(name for name in FILTERS if name in args):
        counts = task_counts.c
        return (
            select(counts.status, counts.task_type, counts.contact_person_id, counts.n)
            .where(*task_filters(args, counts), counts.n > 0)
            .cte("counted")
        )
    return (
        select(Task.status, Task.task_type, Task.contact_person_id, func.count().label("n"))
        .where(*task_filters(args))
        .group_by(Task.status, Task.task_type, Task.contact_person_id)
        .cte("filtered_counts")
    )


def totals(args: dict) -> list:
    """Rows ('status' | 'type' | 'user', ...) of the totals by status, type and assignee (see counts_source)."""
    source = counts_source(args)
    counts = source.c
    total = func.sum(counts.n)
    return [
        select(literal("status"), counts.status, NO_USER, total, NO_NUMBER).group_by(counts.status),
        select(literal("type"), counts.task_type, NO_USER, total, NO_NUMBER)
        .group_by(counts.task_type)
        .having(total > 0),
        select(literal("user"), User.full_name, counts.contact_person_id, total, NO_NUMBER)
        .select_from(source)
        .outerjoin(User, User.id == counts.contact_person_id)
        .group_by(counts.contact_person_id, User.full_name)
        .having(total > 0),
    ]


def kept_median(dialect: str, month_edge) -> list:
    """Rows ('median', lower | upper, ..., microseconds): the middle times to close of the closings from
    month_ago on, without reading or sorting them all. time_to_close_counts, summed from the first whole day on (a
    few dozen rows a day), plus the closings of the first day's part (``month_edge``, an index range), give how many
    fall in each bucket: the buckets are in the order of the times they hold, so running totals tell the bucket of
    each middle position and its rank in it. Then only the times of those one or two buckets are read and ordered
    (times_to_close, plus the first day's in that bucket: a few percent of the closings) and the one at that rank
    picked. Exact: the times are whole microseconds, each with how many closings took exactly that long."""
    spans, edge = time_to_close_counts.c, month_edge.c
    whole_and_edge = union_all(
        select(spans.bucket, spans.n).where(spans.day >= day("month_ago_next_day")),
        select(edge.bucket, literal(1)),
    ).subquery("month_closings")
    by_bucket = (
        select(whole_and_edge.c.bucket, cast(func.sum(whole_and_edge.c.n), BigInteger).label("n"))
        .group_by(whole_and_edge.c.bucket)
        .subquery("month_buckets")
    )
    running = select(
        by_bucket.c.bucket,
        cast(func.sum(by_bucket.c.n).over(order_by=by_bucket.c.bucket), BigInteger).label("upto"),
        by_bucket.c.n,
        cast(func.sum(by_bucket.c.n).over(), BigInteger).label("total"),
    ).cte("bucket_positions")
    before = running.c.upto - running.c.n
    middles = union_all(
        *[
            select(literal(label).label("label"), running.c.bucket, (position - before).label("rank")).where(
                before < position, position <= running.c.upto
            )
            for label, position in (("lower", (running.c.total + 1) // 2), ("upper", running.c.total // 2 + 1))
        ]
    ).cte("middles")
    picked = [
        select(func.min(middles.c.bucket)).scalar_subquery(),
        select(func.max(middles.c.bucket)).scalar_subquery(),
    ]
    times = times_to_close.c
    middle_times = union_all(
        select(times.bucket, times.microseconds, times.n).where(
            times.bucket.in_(picked), times.day >= day("month_ago_next_day")
        ),
        select(edge.bucket, edge.microseconds, literal(1)).where(edge.bucket.in_(picked)),
    ).subquery("middle_times")
    # Numbered in order within their bucket: each row holds the positions upto - n + 1 ... upto, so each middle position
    # is in exactly one row (ROWS, not the default RANGE, so that equal times on several days each get their own).
    ranked = select(
        middle_times.c.bucket,
        middle_times.c.microseconds,
        middle_times.c.n,
        func.sum(middle_times.c.n)
        .over(partition_by=middle_times.c.bucket, order_by=middle_times.c.microseconds, rows=(None, 0))
        .label("upto"),
    ).subquery("ranked_times")
    holds = and_(
        ranked.c.bucket == middles.c.bucket,
        ranked.c.upto - ranked.c.n < middles.c.rank,
        middles.c.rank <= ranked.c.upto,
    )
    return [
        select(literal("median"), middles.c.label, NO_USER, NO_NUMBER, ranked.c.microseconds).join_from(
            middles, ranked, holds
        )
    ]


def day_ranges(ranges: dict):
    """A CTE of the rows (label, kind, first_day, last_day) of ``ranges`` (see ``DAY_RANGES``), the days bound. One
    VALUES list rather than a UNION of one-row SELECTs: PostgreSQL plans it in a fraction of the time. Written as text
    because SQLAlchemy does not cache statements holding its values() construct (they would be compiled again at
    every request); the text is cached, and the labels and kinds in it are this module's constants."""
    rows = ", ".join(f"('{label}', '{kind}', :{first}, :{last})" for label, (kind, first, last) in ranges.items())
    days = sorted({name for _kind, first, last in ranges.values() for name in (first, last)})
    named = "column1 AS label, column2 AS kind, column3 AS first_day, column4 AS last_day"  # VALUES' own names
    listed = text(f"SELECT {named} FROM (VALUES {rows}) AS listed")
    return (
        listed.bindparams(*[bindparam(name, type_=Date()) for name in days])
        .columns(
            column("label", String()), column("kind", String()), column("first_day", Date()), column("last_day", Date())
        )
        .cte("day_ranges")
    )


def kept_statement(dialect: str, args: dict):
    """The dashboard's statement unfiltered or by status: every figure from the kept tables, but for the parts of
    days where a window starts or ends within one, which are COUNTs of short index ranges (the open tasks due from now
    to midnight and from the last day's midnight to a week from now; the closings from 7 and from 30 days ago to the
    next midnight). A status leaves out what it rules out: closed figures for open tasks, due figures for closed
    ones; it applies to the days' counts as to task_counts (due days count open tasks, closed days closed ones)."""
    with_due, with_closed = args.get("status") != "closed", args.get("status") != "open"
    ranges = {
        label: bounds
        for label, bounds in DAY_RANGES.items()
        if not ((bounds[0] == "due" and not with_due) or (bounds[0] == "closed" and not with_closed))
    }
    days = task_day_counts.c
    wanted = day_ranges(ranges)
    summed = select(func.coalesce(func.sum(days.n), 0)).where(
        days.kind == wanted.c.kind,
        days.day >= wanted.c.first_day,
        days.day <= wanted.c.last_day,
        *task_filters(args, days),
    )
    selects = [*totals(args), select(literal("days"), wanted.c.label, NO_USER, summed.scalar_subquery(), NO_NUMBER)]

    def edge(label: str, *conditions) -> None:
        count = select(func.count()).select_from(Task).where(Task.deleted_at.is_(None), *conditions)
        selects.append(select(literal("edge"), literal(label), NO_USER, count.scalar_subquery(), NO_NUMBER))

    if with_due:
        is_open, due = Task.status == "open", Task.task_time
        edge("due:today", is_open, due >= moment("now"), due < moment("midnight"))
        edge("due:week", is_open, due >= moment("week_ahead_day_start"), due < moment("week_ahead"))
    if with_closed:
        closed_at = Task.closed_at
        edge("closed:week", closed_at >= moment("week_ago"), closed_at < moment("week_ago_midnight"))
        spans = (
            select(microseconds_to_close(dialect, Task.__tablename__).label("microseconds"))
            .where(
                Task.deleted_at.is_(None), closed_at >= moment("month_ago"), closed_at < moment("month_ago_midnight")
            )
            .subquery("edge_spans")
        )
        bucket = literal_column(time_to_close_bucket_sql(f"{spans.name}.microseconds")).label("bucket")
        month_edge = select(spans.c.microseconds, bucket).cte("month_edge")
        selects.append(
            select(literal("edge"), literal("closed:month"), NO_USER, func.count(), NO_NUMBER).select_from(month_edge)
        )
        selects += kept_median(dialect, month_edge)
    return union_all(*selects)


def scanned_statement(dialect: str, args: dict):
    """The dashboard's statement under other filters than status alone. Filtered by status and dates only, the
    time-based figures are COUNTs of index ranges (one per week, see ``counted_between``). Other filters pick their
    rows out once (the tasks created, closed or due in the period, in a CTE), which are then grouped
    (``grouped_between``). A status filter leaves out what it rules out, as in ``kept_statement``."""
    with_due, with_closed = args.get("status") != "closed", args.get("status") != "open"
    if set(args) <= RANGED_FILTERS:
        between, tasks, conditions = counted_between, Task, task_filters(args)
        # closed_at is set exactly on closed tasks (a check constraint): a status adds nothing to closed_at >= ...,
        # and leaving it out keeps those counts inside the index.
        closing_conditions = task_filters({name: value for name, value in args.items() if name != "status"})
        source = Task.__tablename__
    else:
        picked = [
            Task.date_created >= moment(WEEK[0]),
            *([Task.closed_at >= moment(CLOSING[0])] if with_closed else []),
            *([(Task.status == "open") & (Task.task_time >= moment(DUE[0]))] if with_due else []),
        ]
        picked_tasks = (
            select(Task.date_created, Task.closed_at, Task.task_time, Task.status)
            .where(*task_filters(args), or_(*picked))
            .cte("picked_tasks")
        )
        between, tasks, conditions, closing_conditions = grouped_between, picked_tasks.c, [], []
        source = picked_tasks.name

    selects = [*totals(args), *between("created", tasks.date_created, WEEK[:-1], conditions, until=WEEK[-1])]
    if with_due:
        selects += between("due", tasks.task_time, DUE, [*conditions, tasks.status == "open"])
    if with_closed:
        recently = [*closing_conditions, tasks.closed_at >= moment("month_ago")]
        selects += between("closed", tasks.closed_at, CLOSING, closing_conditions)
        selects.append(median_to_close(dialect, source, recently))
    return union_all(*selects)


@lru_cache(maxsize=64)
def dashboard_statement(dialect: str, filters: tuple):
    """The dashboard's statement for these filters (``args`` items), with its moments as bound parameters: built
    and compiled once, then reused at every request with the same filters."""
    args = dict(filters)
    return kept_statement(dialect, args) if set(args) <= KEPT_FILTERS else scanned_statement(dialect, args)


def kept_figures(figures: dict, _at: dict) -> dict:
    """The time-based figures from ``kept_statement``'s rows."""
    days, edges = figures.get("days", {}), figures.get("edge", {})
    today = edges.get("due:today", 0)
    return {
        "due_today": today,
        "due_next_7_days": today + days.get("due:week", 0) + edges.get("due:week", 0),
        "due_from_now": today + days.get("due:week", 0) + days.get("due:later", 0),
        "closed_last_7_days": edges.get("closed:week", 0) + days.get("closed:week", 0),
        "closed_last_30_days": edges.get("closed:month", 0) + days.get("closed:month", 0),
        "created": [days.get(f"created:{n}", 0) for n in range(WEEKS)],
        "closed": [days.get(f"closed:{n}", 0) for n in range(WEEKS)],
    }


def scanned_figures(figures: dict, at: dict) -> dict:
    """The time-based figures from ``scanned_statement``'s rows: closings are summed over the segments that make up
    each period."""
    today, this_week, later = (figures.get("due", {}).get(str(n), 0) for n in range(len(DUE)))
    closed = figures.get("closed", {})

    def closings(start: datetime, end: datetime = AFTER_ALL) -> int:
        return sum(closed.get(str(n), 0) for n, name in enumerate(CLOSING) if start <= at[name] < end)

    return {
        "due_today": today,
        "due_next_7_days": today + this_week,
        "due_from_now": today + this_week + later,
        "closed_last_7_days": closings(at["week_ago"]),
        "closed_last_30_days": closings(at["month_ago"]),
        "created": [figures.get("created", {}).get(str(n), 0) for n in range(WEEKS)],
        "closed": [closings(at[start], at[end]) for start, end in pairwise(WEEK)],
    }


def dashboard_figures(args: dict | None = None, now: datetime | None = None) -> dict:
    """Every figure of the dashboard for the tasks the list's filters (``TaskFilterSchema``) select, as of ``now``
    (UTC), in one statement (``dashboard_statement``). Deleted tasks never count.

    - summary, task_types, user_tasks: from ``task_counts`` (a few rows, kept exact by triggers) when the filters
      are status, type and assignee only, else from the filtered tasks. Tasks whose assignee was deleted count
      as "Unassigned".
    - due: open tasks by due time. overdue: task_time < now; today: now <= task_time < the next UTC midnight;
      next_7_days: now <= task_time < now + 7 days (so it includes today's). Overdue is the open total less the
      open tasks due from now on.
    - closed: last_7_days / last_30_days: closed_at >= now - 7 / 30 days. median_seconds_to_close: the median of
      closed_at - date_created over the tasks closed in the last 30 days; of an even number, the mean of the middle
      two; null when none was closed. Exact: the statement gives the middle one or two in whole microseconds, each
      becomes seconds as ``timedelta.total_seconds()`` makes them, and two are averaged as ``statistics.median``
      does.
    - weekly: the last 12 weeks, oldest first, each from Monday 00:00 UTC; the last is the current, partial week.
      created: tasks created in that week; closed: tasks (closed now) whose closed_at falls in that week.

    Unfiltered or by status, every figure comes from tables the writes keep exact (``kept_statement``); under other
    filters, from the tasks (``scanned_statement``).
    """
    args = args or {}
    at = moments(now or utcnow())
    dialect = db.session.get_bind().dialect.name
    kept = set(args) <= KEPT_FILTERS
    rows = db.session.execute(dashboard_statement(dialect, tuple(sorted(args.items()))), at).all()

    by_status, task_types, assignees, figures, middles = {}, [], [], {}, []
    for kind, label, user_id, n, microseconds in rows:
        if kind == "status":
            by_status[label] = int(n)
        elif kind == "type":
            task_types.append((label, int(n)))
        elif kind == "user":
            assignees.append((label, user_id, int(n)))
        elif kind == "median":
            if microseconds is not None:
                middles.append(int(microseconds) / 10**6)
        else:
            figures.setdefault(kind, {})[label] = int(n)
    # Most first; ties by name, "Unassigned" after the people.
    task_types.sort(key=lambda row: (-row[1], row[0]))
    assignees.sort(key=lambda row: (-row[2], row[0] is None, row[0] or ""))
    open_tasks = by_status.get("open", 0)
    timed = (kept_figures if kept else scanned_figures)(figures, at)
    median = (middles[0] + middles[1]) / 2 if len(middles) == 2 else middles[0] if middles else None

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
        "due": {
            "overdue": open_tasks - timed["due_from_now"],
            "today": timed["due_today"],
            "next_7_days": timed["due_next_7_days"],
        },
        "closed": {
            "last_7_days": timed["closed_last_7_days"],
            "last_30_days": timed["closed_last_30_days"],
            "median_seconds_to_close": median,
        },
        "weekly": [
            {"week_start": at[start].date(), "created": created, "closed": closed}
            for start, created, closed in zip(WEEK[:-1], timed["created"], timed["closed"], strict=True)
        ],
    }


def figures_etag(body: dict) -> str:
    """The dashboard's ETag: a hash of every figure, as_of left out.

    A figure changes when a task is written, when a user is renamed (user_tasks shows names), and when time passes
    a task's due time, closing time (plus 7 or 30 days), a midnight or a Monday. A counter the writes bump would
    miss the renames and the passing time, and telling whether time has moved any figure takes the same index reads
    as the figures; every write would also queue on that one row. The figures cost one statement over kept tables,
    so the ETag is taken from them: it changes exactly when a figure does, and a 304 saves the body's bytes and the
    client's work, not the statement. Weak (W/), since two answers with equal figures differ in as_of."""
    figures = {name: value for name, value in body.items() if name != "as_of"}
    encoded = json.dumps(figures, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


@bp.get("/dashboard")
def dashboard():
    """Counts by status, type and assignee, what is due, what was closed and how fast, and the last 12 weeks.

    Every figure counts the tasks the list's filters select (deleted tasks never count), as of one moment, given
    as as_of; all of it in UTC. due: open tasks overdue (task_time before as_of), due before the next UTC
    midnight, and due in the next 7 days (today's included). closed: tasks closed in the last 7 and 30 days, and
    the median time from creation to closing of those closed in the last 30 days (null if none). weekly: tasks
    created and closed in each of the last 12 weeks (Monday 00:00 UTC on), oldest first, the current week last.
    The answer carries a weak ETag of its figures: send it back as If-None-Match to get a 304 without a body while
    every figure is still the same (the copy you hold is then still right; its as_of says when it was computed).
    ---
    parameters: [{in: query, schema: TaskFilterSchema}, IfNoneMatch]
    responses:
      200:
        description: The dashboard.
        headers: {ETag: {description: "A weak ETag of the figures (as_of aside).", schema: {type: string}}}
        content: {application/json: {schema: DashboardSchema}}
      304:
        description: Every figure is as in the dashboard whose ETag was sent; no body.
        headers: {ETag: {description: "The same ETag.", schema: {type: string}}}
      400: {$ref: "#/components/responses/BadRequest"}
    """
    body = dashboard_schema.dump(dashboard_figures(load_args(TaskFilterSchema())))
    response = jsonify(body)
    response.set_etag(figures_etag(body), weak=True)
    return unless_unchanged(response)
