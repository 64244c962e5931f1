"""``flask`` commands, and the start-up steps that share their code."""

import csv
import io
import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import accumulate

import click
import flask_migrate
from flask import Flask, current_app
from flask.cli import with_appcontext
from marshmallow import ValidationError
from sqlalchemy import delete, func, insert, inspect, or_, select
from sqlalchemy.exc import IntegrityError, OperationalError

from config import DEFAULT_ADMIN_PASSWORD, ConfigError, startup_lock
from models import (
    IdempotencyKey,
    LoginSession,
    OneTimeToken,
    OutboxMessage,
    RevokedToken,
    Task,
    TaskEvent,
    User,
    db,
    utcnow,
)
from routes.auth import create_user, duplicate_user
from routes.docs import openapi_document
from routes.errors import describe_validation, is_transient
from routes.limits import CountingRedisStorage
from schemas import RegisterSchema

ADMIN_FULL_NAME = "Administrator"


def admin_fields(username: str, email: str, password: str, full_name: str = ADMIN_FULL_NAME) -> dict:
    """The admin's details, checked by the same rules as a registration."""
    return RegisterSchema().load({"username": username, "email": email, "password": password, "full_name": full_name})


def schema_exists() -> bool:
    return inspect(db.engine).has_table(User.__tablename__)


@click.command("create-admin")
@click.option("--username", help="Default: ADMIN_USERNAME, else admin.")
@click.option("--email", help="Default: ADMIN_EMAIL, else admin@finstack.com.")
@click.option("--full-name", default=ADMIN_FULL_NAME, show_default=True)
# Only a password given on purpose: never the development default that the app's settings fall back to.
@click.option("--password", envvar="ADMIN_PASSWORD", prompt=True, hide_input=True, confirmation_prompt=True)
@with_appcontext
def create_admin_command(username: str | None, email: str | None, full_name: str, password: str) -> None:
    """Create an administrator account (asks for the password unless ADMIN_PASSWORD is set).

    The password follows the rules of every account; in production well-known ones (admin123, password123) are
    refused, as they are for ADMIN_PASSWORD.
    """
    config = current_app.config
    try:
        data = admin_fields(username or config["ADMIN_USERNAME"], email or config["ADMIN_EMAIL"], password, full_name)
    except ValidationError as error:
        raise click.UsageError(describe_validation(error.normalized_messages())) from None
    if not schema_exists():
        raise click.ClickException("The database has no tables yet: run `flask db upgrade` first.")
    create_user(**data, is_admin=True)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise click.ClickException(duplicate_user(data["username"], data["email"]).message) from None
    click.echo(f"Created administrator '{data['username']}'.")


# How long dead single-use links and sent emails are kept after they could matter: the invitations' list shows a
# link's fate, and the outbox's rows what was sent when, for a month.
KEPT_AFTER_USE = timedelta(days=30)


@click.command("purge-tokens")
@with_appcontext
def purge_tokens_command() -> None:
    """Delete what has expired: blocklist entries and login sessions whose tokens have all expired, emailed links
    expired over 30 days ago, and emails sent over 30 days ago (safe to run at any time)."""
    now = utcnow()
    revoked = db.session.execute(delete(RevokedToken).where(RevokedToken.expires_at <= now)).rowcount
    sessions = db.session.execute(delete(LoginSession).where(LoginSession.expires_at <= now)).rowcount
    links = db.session.execute(delete(OneTimeToken).where(OneTimeToken.expires_at <= now - KEPT_AFTER_USE)).rowcount
    sent = OutboxMessage.sent_at <= now - KEPT_AFTER_USE  # failed ones stay, for an administrator to see
    emails = db.session.execute(delete(OutboxMessage).where(OutboxMessage.state == "sent", sent)).rowcount
    db.session.commit()
    click.echo(
        f"Purged {revoked} expired blocklist entries, {sessions} expired login sessions, {links} emailed links "
        f"expired over 30 days ago and {emails} emails sent over 30 days ago."
    )


@click.command("new-accounts-epoch")
@with_appcontext
def new_accounts_epoch_command() -> None:
    """Make every worker of every instance read users and the token blocklist afresh: after editing them in SQL.

    The app's own changes do this by themselves (routes/auth.py's AuthCache); without it, workers notice a change
    made behind the app's back within a minute."""
    limiter = current_app.extensions.get("rate_limiter")
    if limiter is None or not isinstance(limiter.storage, CountingRedisStorage):
        click.echo("Nothing to do: without limits in Redis, workers remember no user between requests.")
        return
    try:
        limiter.storage.start_accounts_epoch()
    except Exception as error:
        message = f"Redis did not take the new epoch ({error}): workers catch up within a minute."
        raise click.ClickException(message) from None
    click.echo("Started a new accounts epoch: every worker reads users and the blocklist afresh.")


@click.command("purge-idempotency-keys")
@with_appcontext
def purge_idempotency_keys_command() -> None:
    """Delete Idempotency-Key records older than their 24 hours (safe to run at any time)."""
    purged = db.session.execute(delete(IdempotencyKey).where(IdempotencyKey.expires_at <= utcnow())).rowcount
    db.session.commit()
    click.echo(f"Purged {purged} expired idempotency keys.")


class Age(click.ParamType):
    """A duration such as 90d, 12w or 36h."""

    name = "age"
    units = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}

    def convert(self, value, param, ctx):
        if isinstance(value, timedelta):
            return value
        number, unit = value[:-1], value[-1:].lower()
        if unit not in self.units or not (number.isascii() and number.isdigit()):
            self.fail(f"{value!r} is not an age such as 90d, 12w or 36h.", param, ctx)
        try:
            return int(number) * self.units[unit]
        except OverflowError:
            self.fail(f"{value!r} is too long ago.", param, ctx)


PURGE_BATCH_SIZE = 1000  # tasks per transaction: locks stay short however many there are


@click.command("purge-deleted")
@click.option(
    "--older-than",
    "age",
    type=Age(),
    default="90d",
    show_default=True,
    help="Remove tasks deleted at least this long ago (h, d or w).",
)
@click.option("--dry-run", is_flag=True, help="Only say how many tasks would be removed.")
@with_appcontext
def purge_deleted_command(age: timedelta, dry_run: bool) -> None:
    """Remove for good the tasks deleted long enough ago; their history stays, ending in a "purged" event."""
    try:
        cutoff = utcnow() - age
    except OverflowError:
        raise click.BadParameter("Too long ago.", param_hint="--older-than") from None
    due = Task.deleted_at.is_not(None) & (Task.deleted_at <= cutoff)
    if dry_run:
        count = db.session.scalar(select(func.count()).select_from(Task).where(due))
        click.echo(f"{count} task(s) deleted before {cutoff.isoformat()} would be purged.")
        return
    purged = 0
    while True:
        # Locked, so that a restore running meanwhile either waits for this batch or wins (and is skipped here).
        batch = db.session.scalars(
            select(Task.id).where(due).order_by(Task.deleted_at, Task.id).limit(PURGE_BATCH_SIZE).with_for_update()
        ).all()
        if not batch:
            break
        now = utcnow()
        db.session.execute(
            insert(TaskEvent), [{"task_id": task_id, "occurred_at": now, "action": "purged"} for task_id in batch]
        )
        db.session.execute(delete(Task).where(Task.id.in_(batch)).execution_options(synchronize_session=False))
        db.session.commit()
        purged += len(batch)
    click.echo(f"Purged {purged} task(s) deleted before {cutoff.isoformat()}.")


@click.command("openapi")
@click.option(
    "--server",
    default="http://127.0.0.1:5000",
    show_default=True,
    help="The base URL the document tells clients to call.",
)
@with_appcontext
def openapi_command(server: str) -> None:
    """Print the OpenAPI document, e.g. for Postman: flask openapi > openapi.json."""
    click.echo(json.dumps(openapi_document(current_app, server.rstrip("/") or "/"), indent=2))


DEMO_DOMAIN = "demo.finstack.example"  # demo accounts, and so demo data, are recognised by this email domain
DEMO_PASSWORD = "demo-password"
SEED_BATCH_SIZE = 50_000  # tasks per COPY (or executemany) and per transaction
SEED_PAST_DAYS = 4 * 365
SEED_FUTURE_DAYS = 120
DAY = 86_400
FIRST_NAMES = (
    "Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hiroshi", "Ines", "Jonas", "Karin", "Liam",
    "Maya", "Nikolai", "Olivia", "Pedro", "Quinn", "Rosa", "Samuel", "Tomás", "Uma", "Victor", "Wen", "Ximena",
    "Yusuf", "Zoë", "Amélie", "Björn", "Chloé", "Dmitri", "Émile", "Fatima", "Gustav", "Hannah", "Ayşe", "Søren",
    "Lucía", "Mateo", "Priya", "Kwame",
)  # fmt: skip
LAST_NAMES = (
    "Adams", "Baker", "Costa", "Dubois", "Evans", "Fischer", "García", "Hansen", "Ivanova", "Jensen", "Kowalski",
    "Larsen", "Müller", "Nakamura", "O'Brien", "Petrov", "Quinn", "Rossi", "Schmidt", "Tanaka", "Umar", "Varga",
    "Walker", "Xu", "Yilmaz", "Zhang", "Andersson", "Becker", "Chen", "Delgado", "Eriksen", "Fontaine", "Gonzalez",
    "Horvat", "Ibrahim", "Johansson", "Khan", "Lindqvist", "Moreau", "Novak", "Okafor", "Patel", "Ramírez",
    "Svensson", "Thompson", "Nguyen",
)  # fmt: skip
ENTITY_STEMS = (
    "ABC", "Northwind", "Harbor", "Summit", "Bluewater", "Cedar", "Granite", "Evergreen", "Pinnacle", "Riverside",
    "Atlas", "Beacon", "Crescent", "Keystone", "Lighthouse", "Meridian", "Oakridge", "Redwood", "Silverline",
    "Sterling", "Trident", "Vanguard", "Westbrook", "Zenith", "Alder", "Birchwood", "Copperfield", "Driftwood",
    "Eastgate", "Fairview", "Goldcrest", "Highland", "Ironbridge", "Juniper", "Kingsley", "Lakeshore", "Maple Leaf",
    "Northgate", "Orchard", "Parkside", "Quarry Hill", "Rosewood", "Stonegate", "Tidewater", "Union Square",
    "Valley Forge", "Willow Creek", "Aurora", "Brightwater", "Canyon", "Delta", "Falcon", "Glacier", "Horizon",
    "Kestrel", "Monarch", "Olympus", "Prairie", "Sapphire", "Vertex", "Nordlicht", "Sonnenberg", "Zürich Alpine",
    "Île-de-France", "São Paulo", "Kraków", "Malmö", "Århus", "Bodø", "Cádiz", "Anderson", "Baxter", "Crawford",
    "Donovan", "Fitzgerald", "Hargreaves", "Lancaster", "Pemberton", "Whitfield", "Yamamoto",
)  # fmt: skip
ENTITY_SUFFIXES = (
    "Corporation", "Holdings", "LLC", "Inc.", "Ltd", "Capital Partners", "Trust", "Group", "Partners", "Ventures",
    "Industries", "Logistics", "Foods", "Health", "Realty", "Energy", "Advisors", "Family Office", "Foundation",
    "Manufacturing", "Technologies", "Insurance", "Asset Management", "GmbH", "S.A.", "AB",
)  # fmt: skip
# Weights: calls and emails are everyday work, site visits and tax filings rare.
TASK_TYPES = {
    "Call": 22, "Email": 18, "Meeting": 14, "Follow-up": 14, "Review": 8, "Document request": 6, "KYC check": 5,
    "Site visit": 4, "Onboarding": 4, "Quarterly review": 3, "Tax filing": 2,
}  # fmt: skip
NOTES = (
    "Discussed the quarterly figures; client happy with the results.",
    "Left a voicemail, will try again tomorrow.",
    "Waiting for the signed engagement letter.",
    "Sent the updated fee schedule.",
    "Client asked for a breakdown of last year's costs.",
    'Requested the "beneficial owner" declaration again.',
    "Passport copy expired: new one needed before the account review.",
    "Meeting moved at the client's request.",
    "Reviewed the portfolio allocation, no changes for now.",
    "New CFO, introductions needed.",
    "Documents received, filed in the client folder.",
    "Escalated to compliance for a second look.",
    "Agreed next steps:\n- draft the proposal\n- send it by Friday",
    "Invoice query resolved, credit note issued.",
    "Rückruf erbeten, Ansprechpartner im Urlaub bis Montag.",
    "Prefers email over phone calls.",
    "Site visit confirmed, parking at the back of the building.",
    "Onboarding checklist complete except for the tax residency form.",
    "Asked about ESG options, sent the brochure.",
    "Renewal due next quarter, prepare an offer.",
)
NOTE_SHARE = 0.4
UNASSIGNED_SHARE = 0.03
TASK_COLUMNS = (
    "id", "date_created", "entity_name", "task_type", "task_time", "contact_person_id", "note", "status",
    "created_by_id", "updated_at", "closed_at", "closed_by_id",
)  # fmt: skip
# How many days after (or before, for calls logged afterwards) its creation a task is due.
LEAD_DAYS = {-3: 2, -2: 3, -1: 5, 0: 20, 1: 15, 2: 10, 3: 8, 5: 7, 7: 8, 10: 5, 14: 6, 21: 4, 30: 4, 45: 2, 60: 1}
UUID_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


@click.command("seed-demo")
@click.option(
    "--users",
    "user_count",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="Demo accounts to spread the tasks over: demo0001, demo0002, ... (existing ones are reused).",
)
@click.option(
    "--tasks", "task_count", default=10_000, show_default=True, type=click.IntRange(min=0), help="Tasks to add."
)
@click.option("--force", is_flag=True, help="Seed even though the database holds data other than demo data.")
@click.option("--seed", type=int, help="Random seed, to generate the same data again (default: a new one each run).")
@with_appcontext
def seed_demo_command(user_count: int, task_count: int, force: bool, seed: int | None) -> None:
    """Fill the database with demo users and tasks (adds to earlier demo data; refuses a database with other data).

    Demo accounts demo0001, demo0002, ... share the password demo-password; demo0001 is an administrator.
    Refused in production (APP_ENV or FLASK_ENV=production).
    """
    if current_app.config["APP_ENV"] == "production":
        raise click.ClickException(
            f"seed-demo does not run in production: it makes an administrator, demo0001, whose password "
            f"({DEMO_PASSWORD!r}) is published. Seed a development database (APP_ENV=development) instead."
        )
    if not schema_exists():
        raise click.ClickException("The database has no tables yet: run `flask db upgrade` first.")
    if not force:
        refuse_non_demo_data()
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    started = time.perf_counter()
    user_ids, created = ensure_demo_users(user_count)
    prepare, write, suffix = TASK_WRITERS[db.session.get_bind().dialect.name]
    rng = random.Random(f"tasks:{seed}")
    batches = demo_task_batches(rng, task_count, user_ids, utcnow(), SEED_BATCH_SIZE, suffix)
    with click.progressbar(length=task_count, label="Seeding tasks", show_pos=True) as bar:
        for count, payload in prefetched((len(rows), prepare(rows)) for rows in batches):
            write(payload)
            db.session.commit()  # one transaction per batch: a huge seed shows progress and holds no giant one
            bar.update(count)
    elapsed = time.perf_counter() - started
    click.echo(
        f"Seeded {task_count} tasks and {user_count} demo users ({created} new) in {elapsed:.1f} s (--seed {seed})."
    )


def refuse_non_demo_data() -> None:
    """Stop (changing nothing) when some user is neither a demo account nor an administrator, or some task was
    not created by a demo account: seeding would mix made-up data into real data."""
    demo = User.email.endswith(f"@{DEMO_DOMAIN}")
    users = db.session.scalar(select(func.count()).where(~demo, ~User.is_admin))
    demo_ids = select(User.id).where(demo)
    tasks = db.session.scalar(
        select(func.count()).where(or_(Task.created_by_id.is_(None), Task.created_by_id.not_in(demo_ids)))
    )
    if users or tasks:
        raise click.ClickException(
            f"The database holds data that is not demo data: {users} account(s) neither demo nor administrator, "
            f"{tasks} task(s) not created by a demo account. Seed an empty database, or pass --force to add "
            "demo data to this one anyway."
        )


def demo_username(number: int) -> str:
    return f"demo{number:04d}"


def ensure_demo_users(count: int) -> tuple[list[str], int]:
    """The ids (hex) of demo0001 ... demo<count>, creating those missing, and how many were created."""
    wanted = [demo_username(number) for number in range(1, count + 1)]
    existing = dict(
        db.session.execute(select(User.username, User.id).where(User.email.endswith(f"@{DEMO_DOMAIN}"))).all()
    )
    missing = [(number, username) for number, username in enumerate(wanted, 1) if username not in existing]
    if missing:
        hashed = User()
        hashed.set_password(DEMO_PASSWORD)  # once: a real hash takes ~100 ms, and every demo account shares it
        now = utcnow()
        rows = [
            {
                "id": uuid.uuid4(),
                "username": username,
                "email": f"{username}@{DEMO_DOMAIN}",
                "password_hash": hashed.password_hash,
                "full_name": f"{FIRST_NAMES[number % len(FIRST_NAMES)]} {LAST_NAMES[number * 7 % len(LAST_NAMES)]}",
                "is_active": True,
                "created_at": now,
                "is_admin": number == 1,  # an administrator may update any task: what benchmarks need
            }
            for number, username in missing
        ]
        try:
            db.session.execute(insert(User), rows)
            db.session.commit()
        except IntegrityError:
            db.session.rollback()
            raise click.ClickException(
                f"A demo account's username ({wanted[0]}, ...) or email (@{DEMO_DOMAIN}) is taken by another account."
            ) from None
        existing |= {row["username"]: row["id"] for row in rows}
    return [existing[username].hex for username in wanted], len(missing)


def uuid4_hexes(count: int) -> list[str]:
    """``count`` random (version 4) UUIDs as 32 hex digits, which both databases accept: a third of uuid4()'s cost."""
    raw = os.urandom(16 * count).hex()
    return [
        f"{raw[i : i + 12]}4{raw[i + 13 : i + 16]}{UUID_VARIANT[raw[i + 16]]}{raw[i + 17 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


@cache
def demo_entities() -> tuple[tuple[str, ...], list[float]]:
    """A few thousand client names, and cumulative weights that give some clients many tasks and most a few."""
    names = {f"{stem} {suffix}" for stem in ENTITY_STEMS for suffix in ENTITY_SUFFIXES}
    names |= {
        f"{first} & {second} {suffix}"
        for first in LAST_NAMES[:20]
        for second in LAST_NAMES[20:40]
        for suffix in ("LLP", "Partners", "GmbH", "Associates")
    }
    names.add("Müller & Söhne GmbH")
    ordered = sorted(names)
    random.Random("entities").shuffle(ordered)  # popularity unrelated to the alphabet, the same in every run
    return tuple(ordered), list(accumulate(1 / (rank + 10) for rank in range(len(ordered))))


def demo_task_batches(
    rng: random.Random, total: int, user_ids: list[str], now: datetime, batch_size: int, suffix: str
) -> Iterator[list[tuple]]:
    """Rows of ``TASK_COLUMNS`` in batches, oldest first. Created over the last four years (more of them lately),
    due near their creation (some in the future); older tasks mostly closed, future ones mostly open.

    Timestamps are seconds since the first day's midnight, formatted from precomputed day and time strings
    (``suffix`` ends them for the database at hand); every random draw but the ids comes from ``rng``.
    """
    first_day = (now - timedelta(days=SEED_PAST_DAYS)).date()
    now_s = int((now - datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)).total_seconds())
    days = [(first_day + timedelta(days=n)).isoformat() for n in range(SEED_PAST_DAYS + SEED_FUTURE_DAYS)]
    clock = [f" {s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}{suffix}" for s in range(DAY)]

    def stamp(seconds: int) -> str:
        day, second = divmod(seconds, DAY)
        return days[day] + clock[second]

    entities, entity_weights = demo_entities()
    types, type_weights = tuple(TASK_TYPES), list(accumulate(TASK_TYPES.values()))
    contacts = [*user_ids, None]
    contact_weights = list(accumulate([(1 - UNASSIGNED_SHARE) / len(user_ids)] * len(user_ids) + [UNASSIGNED_SHARE]))
    notes = [*NOTES, None]
    note_weights = list(accumulate([NOTE_SHARE / len(NOTES)] * len(NOTES) + [1 - NOTE_SHARE]))
    leads, lead_weights = tuple(LEAD_DAYS), list(accumulate(LEAD_DAYS.values()))
    logged_at = range(7 * 3600, 20 * 3600)  # when people log tasks
    due_at = range(8 * 3600, 18 * 3600, 900)  # and when tasks are due: office hours, on the quarter hour
    past_days = now_s // DAY + 1
    month = 30 * DAY
    random_ = rng.random
    for offset in range(0, total, batch_size):
        k = min(batch_size, total - offset)
        ids = uuid4_hexes(k)
        batch = zip(
            ids,
            rng.choices(entities, cum_weights=entity_weights, k=k),
            rng.choices(types, cum_weights=type_weights, k=k),
            rng.choices(contacts, cum_weights=contact_weights, k=k),
            rng.choices(notes, cum_weights=note_weights, k=k),
            rng.choices(user_ids, k=k),
            rng.choices(leads, cum_weights=lead_weights, k=k),
            rng.choices(logged_at, k=k),
            rng.choices(due_at, k=k),
            strict=True,
        )
        rows = []
        for position, (task_id, entity, task_type, contact, note, creator, lead, logged, due) in enumerate(
            batch, offset
        ):
            # In order of creation, as a real table fills (and indexes on the dates grow at one end, which is
            # fast); u**0.7 puts more tasks in recent years: the firm grew.
            created = int(past_days * ((position + random_()) / total) ** 0.7) * DAY + logged
            if created > now_s:
                created -= DAY
            when = max(created // DAY + lead, 0) * DAY + due
            age = now_s - when
            closed = random_() < (0.7 if age > month else 0.45 if age > 0 else 0.05)
            if closed:  # closed when done (by the assignee, else the creator), last touched then or a little later
                done = max(created, min(when, now_s))
                updated = done + int(random_() * min(3 * DAY, now_s - done))
                closed_at, closed_by = stamp(done), contact or creator
            else:  # edited just after being logged, at most
                updated = created + int(random_() * min(2 * 3600, now_s - created))
                closed_at = closed_by = None
            rows.append(
                (
                    task_id,
                    stamp(created),
                    entity,
                    task_type,
                    stamp(when),
                    contact,
                    note,
                    "closed" if closed else "open",
                    creator,
                    stamp(updated),
                    closed_at,
                    closed_by,
                )
            )
        yield rows


def prefetched(items: Iterator) -> Iterator:
    """The items, each made in a worker thread while the caller handles the one before: the next batch is
    generated while the database stores this one (the drivers release the GIL while they wait for it)."""
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = worker.submit(next, items, None)
        while (item := pending.result()) is not None:
            pending = worker.submit(next, items, None)
            yield item


def csv_text(rows: list[tuple]) -> io.StringIO:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)  # None becomes an unquoted empty field: NULL
    buffer.seek(0)
    return buffer


def copy_tasks(buffer: io.StringIO) -> None:
    """PostgreSQL: COPY the rows in CSV through the session's own connection (so inside its transaction)."""
    with db.session.connection().connection.cursor() as cursor:
        cursor.copy_expert(f"COPY tasks ({', '.join(TASK_COLUMNS)}) FROM STDIN WITH (FORMAT csv)", buffer)


def insert_tasks(rows: list[tuple]) -> None:
    """SQLite: one prepared INSERT executed for every row, in the session's transaction."""
    placeholders = ", ".join("?" * len(TASK_COLUMNS))
    db.session.connection().exec_driver_sql(
        f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) VALUES ({placeholders})", rows
    )


# How each database takes the rows (made ready in the worker thread, then written), and how its timestamps end:
# SQLite's in SQLAlchemy's own format (naive UTC, microseconds), so that comparisons with the app's values hold.
TASK_WRITERS = {"postgresql": (csv_text, copy_tasks, "+00"), "sqlite": (list, insert_tasks, ".000000")}


def prepare_database(app: Flask) -> None:
    """Before serving: apply pending migrations (when AUTO_MIGRATE) and create the first admin (when configured)."""
    with app.app_context():
        if app.config["AUTO_MIGRATE"]:
            migrate_to_latest(app)
        if app.config["ADMIN_PASSWORD"]:
            create_first_admin(app)


def migrate_to_latest(app: Flask) -> None:
    """``flask db upgrade``, once even when every gunicorn worker starts at the same moment."""
    try:
        with startup_lock(app.instance_path):
            flask_migrate.upgrade()
    except OperationalError as error:
        if not is_transient(error):
            raise  # a migration that fails on a reachable database must stop the start, loudly
        # Start anyway: the health check reports the database, and requests answer 503 until it is back.
        app.logger.error("Database unreachable at start-up; migrations not applied: %s", error)


def create_first_admin(app: Flask) -> None:
    """Create the administrator from ADMIN_* settings, once: only while the database has no users at all."""
    try:
        data = admin_fields(app.config["ADMIN_USERNAME"], app.config["ADMIN_EMAIL"], app.config["ADMIN_PASSWORD"])
    except ValidationError as error:
        raise ConfigError(f"ADMIN_* settings: {describe_validation(error.normalized_messages())}") from None
    try:
        if not schema_exists():
            return  # `flask db upgrade` is about to create it; the next start creates the admin
        if db.session.scalar(select(User.id).limit(1)) is not None:
            return
        create_user(**data, is_admin=True)
        db.session.commit()
    except IntegrityError:
        db.session.rollback()  # another worker starting at the same time created it first
        return
    except OperationalError as error:
        db.session.rollback()
        if not is_transient(error):
            raise
        app.logger.error("Database unreachable; the first administrator was not created: %s", error)
        return
    if data["password"] == DEFAULT_ADMIN_PASSWORD:
        app.logger.warning(
            "Created the default administrator '%s' with the documented password '%s': change it now.",
            data["username"],
            DEFAULT_ADMIN_PASSWORD,
        )
    else:
        app.logger.warning("Created the first administrator '%s' from ADMIN_* settings.", data["username"])
