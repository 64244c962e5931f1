"""marshmallow schemas: what the API accepts (load) and what it answers (dump)."""

from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, date, datetime, time, timedelta
from functools import cache

from flask import current_app, has_app_context
from marshmallow import Schema, ValidationError, fields, post_load, pre_load, validates_schema
from marshmallow.validate import Email, Length, OneOf, Range, Regexp

from config import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, password_problem, time_zones
from models import OUTBOX_STATES, TASK_EVENT_ACTIONS, TASK_STATUSES
from tokens import MAX_TOKEN_LENGTH

SORTABLE_FIELDS = ("date_created", "task_time", "entity_name", "task_type", "status", "updated_at")
MAX_PER_PAGE = 100
MAX_PAGE = 10**9  # keeps OFFSET inside a 64-bit integer on PostgreSQL
MAX_BULK_IDS = 1000
DEFAULT_FACET_LIMIT = 100
MAX_FACET_LIMIT = 1000
# Output-only task fields a client may echo back (the "duplicate" button does); they are dropped, never written.
READ_ONLY_TASK_FIELDS = (
    "id", "date_created", "updated_at", "created_by", "contact_person", "version", "closed_at", "closed_by",
    "deleted_at",
)  # fmt: skip
MAX_HISTORY_PER_PAGE = 100


class Text(fields.String):
    """A string the database can store: NUL characters and lone surrogates (which JSON can carry in
    ``\\ud800`` escapes) are rejected here rather than failing in the driver."""

    default_error_messages = {
        "null_character": "Must not contain NUL characters.",
        "not_unicode": "Must be valid Unicode text.",
    }

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in value:
            raise self.make_error("null_character")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise self.make_error("not_unicode") from error
        return value


class Trimmed(Text):
    """A string with surrounding white space removed before validation."""

    def _deserialize(self, value, attr, data, **kwargs):
        return super()._deserialize(value, attr, data, **kwargs).strip()


class Lowercase(Trimmed):
    """A case-insensitive name, stored in lower case; validated after folding, which can lengthen it ("İ")."""

    def _deserialize(self, value, attr, data, **kwargs):
        return super()._deserialize(value, attr, data, **kwargs).lower()


class JSONBoolean(fields.Boolean):
    """true or false, as JSON writes them: not 1, "yes" or "on"."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


class QueryInteger(fields.Integer):
    """A whole number written in ASCII digits, as a query string should carry it ("1_0" and " 1" are not)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class IdList(fields.List):
    """Task ids; the count is checked before the ids, so a huge list costs one error rather than one per item."""

    def __init__(self, **kwargs):
        super().__init__(fields.UUID(), **kwargs)
        self.count = Length(min=1, max=MAX_BULK_IDS)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, list):
            self.count(value)
        return super()._deserialize(value, attr, data, **kwargs)


class Timestamp(fields.AwareDateTime):
    """ISO 8601 in (no offset means UTC; an offset is converted to UTC), ISO 8601 with its offset out."""

    def __init__(self, **kwargs):
        super().__init__(format="iso", default_timezone=UTC, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        try:
            return value.astimezone(UTC)
        except OverflowError as error:  # e.g. 0001-01-01T00:00:00+01:00 has no UTC equivalent
            raise self.make_error("invalid", input=value, obj_type=self.OBJ_TYPE) from error


class DateOrDateTime(fields.String):
    """An ISO 8601 date (``2025-07-01``, ``20250701``) loads as a ``date``; anything else must be an ISO 8601
    timestamp."""

    default_error_messages = {"invalid": "Not a valid ISO 8601 date or date-time."}
    timestamp = Timestamp()

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            return date.fromisoformat(value)
        except (TypeError, ValueError):
            pass
        try:
            return self.timestamp.deserialize(value)
        except ValidationError as error:
            raise self.make_error("invalid") from error


def as_timestamp(moment: date | datetime) -> datetime:
    """A timestamp as it is; a bare date as the first moment of that day, in UTC."""
    return moment if isinstance(moment, datetime) else datetime.combine(moment, time.min, tzinfo=UTC)


class Phone(Trimmed):
    """An optional phone number as people write it ("+44 20 7946 0958"); an empty string clears it."""

    def __init__(self, **kwargs):
        super().__init__(
            allow_none=True,
            validate=[
                Length(max=32),
                Regexp(r"^\+?[0-9][0-9 ().-]*[0-9]$", error="Use digits, spaces, '()', '.', '-' and a leading '+'."),
            ],
            **kwargs,
        )

    def _deserialize(self, value, attr, data, **kwargs):
        return super()._deserialize(value, attr, data, **kwargs) or None

    def _validate(self, value):
        if value is not None:
            super()._validate(value)


def password_field(**kwargs) -> Text:
    return Text(
        required=True, load_only=True, validate=Length(min=MIN_PASSWORD_LENGTH, max=MAX_PASSWORD_LENGTH), **kwargs
    )


def check_password_policy(password: str, username: str | None, email: str | None, field: str = "password") -> None:
    """The password rule (config.password_problem) for this account; well-known passwords are refused when the
    app at hand runs in production."""
    production = has_app_context() and current_app.config.get("APP_ENV") == "production"
    problem = password_problem(password, username, email, production)
    if problem:
        raise ValidationError(problem, field)


class UserSchema(Schema):
    id = fields.UUID(dump_only=True, required=True)
    username = fields.String(dump_only=True, required=True, metadata={"example": "jdoe"})
    email = fields.String(dump_only=True, required=True, metadata={"example": "jdoe@example.com"})
    full_name = fields.String(dump_only=True, required=True, metadata={"example": "Jane Doe"})
    is_active = fields.Boolean(dump_only=True, required=True)
    created_at = Timestamp(dump_only=True, required=True)
    is_admin = fields.Boolean(dump_only=True, required=True)
    phone = fields.String(dump_only=True, required=True, allow_none=True, metadata={"example": "+44 20 7946 0958"})
    time_zone = fields.String(
        dump_only=True,
        required=True,
        metadata={
            "description": "IANA time zone name: the one the user chose, else the firm's DEFAULT_TIME_ZONE.",
            "example": "Europe/London",
        },
    )


def email_field(**kwargs) -> Lowercase:
    return Lowercase(validate=[Length(max=255), Email()], **kwargs)


# One line of text: a name goes into emails' subjects and greetings, where a line break or another control character
# would break the header or the layout. (Trimmed strips a last line break, which "$" would let through.)
ONE_LINE = Regexp(
    r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$", error="Must be one line of text, without control characters."
)


def full_name_field(**kwargs) -> Trimmed:
    return Trimmed(validate=[Length(min=1, max=120), ONE_LINE], **kwargs)


def username_field(**kwargs) -> Lowercase:
    return Lowercase(
        validate=[
            Length(min=3, max=80),
            Regexp(
                r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                error="Use letters, digits, '.', '_' or '-', starting with a letter or digit.",
            ),
        ],
        metadata={"example": "jdoe"},
        **kwargs,
    )


class RegisterSchema(Schema):
    # Usernames and emails are case-insensitive: stored and compared in lower case.
    username = username_field(required=True)
    email = email_field(required=True, metadata={"example": "jdoe@example.com"})
    password = password_field(metadata={"example": "a-long-passphrase"})
    full_name = full_name_field(required=True, metadata={"example": "Jane Doe"})

    @validates_schema
    def password_is_not_the_name(self, data, **kwargs):
        if "password" in data:
            check_password_policy(data["password"], data.get("username"), data.get("email"))


class UserCreateSchema(RegisterSchema):
    """What an administrator sends to create an account with ``POST /api/users``."""

    is_admin = JSONBoolean(load_default=False)


class LoginSchema(Schema):
    username = Lowercase(required=True, validate=Length(min=1, max=255), metadata={"example": "admin"})
    password = Text(required=True, load_only=True, validate=Length(min=1, max=128), metadata={"example": "admin123"})


class RefreshSchema(Schema):
    refresh_token = Text(validate=Length(min=1, max=4096))


class PasswordChangeSchema(Schema):
    current_password = Text(
        required=True, load_only=True, validate=Length(min=1, max=128), metadata={"example": "admin123"}
    )
    new_password = password_field()

    @validates_schema
    def differs_from_current(self, data, **kwargs):
        if data.get("new_password") is not None and data.get("new_password") == data.get("current_password"):
            raise ValidationError("Must differ from the current password.", "new_password")


def time_zone_name(value: str) -> None:
    if value not in time_zones():
        raise ValidationError("Must be an IANA time zone name such as Europe/London or America/New_York.")


class ProfileSchema(Schema):
    """What people change about themselves with ``PATCH /api/users/me``."""

    full_name = full_name_field(metadata={"example": "Jane Doe"})
    email = email_field(
        metadata={
            "description": "Accepted unchanged only: a new address goes through POST /api/auth/me/email.",
            "example": "jdoe@example.com",
        }
    )
    phone = Phone(metadata={"example": "+44 20 7946 0958"})
    time_zone = Text(
        attribute="chosen_time_zone",
        allow_none=True,
        validate=time_zone_name,
        metadata={"description": "An IANA name; null: the firm's DEFAULT_TIME_ZONE.", "example": "Europe/London"},
    )


class UserQuerySchema(Schema):
    include_inactive = fields.Boolean(
        load_default=False, metadata={"description": "Administrators only: include deactivated accounts."}
    )


class UserAdminSchema(Schema):
    """What an administrator changes about an account with ``PATCH /api/users/<id>``."""

    is_active = JSONBoolean()
    is_admin = JSONBoolean()


class Person(fields.Nested):
    """A user inside a task."""

    def __init__(self, **kwargs):
        super().__init__(UserSchema, **kwargs)


class TaskSchema(Schema):
    id = fields.UUID(dump_only=True, required=True)
    date_created = Timestamp(dump_only=True, required=True)
    entity_name = Trimmed(required=True, validate=Length(min=1, max=255), metadata={"example": "ABC Corporation"})
    task_type = Trimmed(required=True, validate=Length(min=1, max=50), metadata={"example": "Call"})
    task_time = Timestamp(required=True, metadata={"example": "2024-12-25T10:00:00Z"})
    contact_person_id = fields.UUID(
        required=True, load_only=True, metadata={"description": "The assignee: the id of an active user."}
    )
    contact_person = Person(dump_only=True, required=True, allow_none=True)
    note = Text(allow_none=True, validate=Length(max=10_000), metadata={"example": "Quarterly review"})
    status = Text(validate=OneOf(TASK_STATUSES), metadata={"description": "Defaults to open."})
    created_by = Person(dump_only=True, required=True, allow_none=True)
    updated_at = Timestamp(dump_only=True, required=True)
    version = fields.Integer(
        dump_only=True,
        required=True,
        metadata={"description": "Grows with every change; sent as the ETag, compared with If-Match."},
    )
    closed_at = Timestamp(dump_only=True, required=True, allow_none=True, metadata={"description": "Null while open."})
    closed_by = Person(dump_only=True, required=True, allow_none=True)
    deleted_at = Timestamp(
        dump_only=True, required=True, allow_none=True, metadata={"description": "Set on deleted tasks only."}
    )

    @pre_load
    def drop_read_only_fields(self, data, **kwargs):
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key not in READ_ONLY_TASK_FIELDS}
        return data


class TaskUpdateSchema(TaskSchema):
    """Any subset of the task's fields (``PUT``); ``note: null`` clears the note."""

    def __init__(self, **kwargs):
        super().__init__(partial=True, **kwargs)


class TaskStatusSchema(Schema):
    status = Text(required=True, validate=OneOf(TASK_STATUSES), metadata={"example": "closed"})


class BulkStatusSchema(Schema):
    task_ids = IdList(required=True, metadata={"minItems": 1, "maxItems": MAX_BULK_IDS})
    status = Text(required=True, validate=OneOf(TASK_STATUSES), metadata={"example": "open"})


class TaskFilterSchema(Schema):
    """The task list's filters, shared by the list, the dashboard, the export and the facets; every parameter is
    checked, none is silently ignored."""

    status = Text(validate=OneOf(TASK_STATUSES))
    task_type = Text(
        validate=Length(max=50), metadata={"description": "Case-insensitive substring.", "example": "call"}
    )
    entity_name = Text(
        validate=Length(max=255), metadata={"description": "Case-insensitive substring.", "example": "abc"}
    )
    contact_person_id = fields.UUID(metadata={"description": "Only tasks assigned to this user."})
    date_from = DateOrDateTime(
        metadata={"description": "Created at or after this date or timestamp.", "example": "2024-01-01"}
    )
    date_to = DateOrDateTime(metadata={"description": "Created on or before this date (the whole day) or timestamp."})

    @post_load
    def to_bounds(self, data, **kwargs):
        """Turn the dates into ``created_from`` (inclusive) and ``created_before`` (exclusive)."""
        date_from, date_to = data.pop("date_from", None), data.pop("date_to", None)
        if date_from is not None:
            data["created_from"] = as_timestamp(date_from)
        if date_to is not None:
            # date_to is inclusive: a bare date reaches its next midnight, a timestamp its next microsecond
            # (the finest time both databases store).
            step = timedelta(microseconds=1) if isinstance(date_to, datetime) else timedelta(days=1)
            with suppress(OverflowError):  # the very end of year 9999 bounds nothing
                data["created_before"] = as_timestamp(date_to) + step
        if "created_from" in data and "created_before" in data and data["created_from"] >= data["created_before"]:
            raise ValidationError("Must not be later than date_to.", "date_from")
        return data


class TaskSortSchema(TaskFilterSchema):
    """The filters and the order of the tasks (the CSV export's query string)."""

    sort_by = Text(load_default="date_created", validate=OneOf(SORTABLE_FIELDS))
    sort_order = Text(load_default="desc", validate=OneOf(("asc", "desc")))


class ExportQuerySchema(TaskSortSchema):
    """The CSV export's query string: the list's filters and order, and the file's first bytes."""

    bom = fields.Boolean(
        load_default=False,
        metadata={
            "description": "Start the file with a UTF-8 byte-order mark, so that Excel reads it as UTF-8 "
            '("Müller & Söhne" rather than mojibake). Off by default, for scripts and other spreadsheets.'
        },
    )


class TaskQuerySchema(TaskSortSchema):
    """The task list's query string."""

    page = QueryInteger(load_default=1, validate=Range(min=1, max=MAX_PAGE))
    per_page = QueryInteger(
        load_default=20, validate=Range(min=1), metadata={"description": f"Values above {MAX_PER_PAGE} are capped."}
    )
    cursor = Text(
        validate=Length(min=1, max=4096),  # a long non-ASCII sort value and every filter fit
        metadata={
            "description": "pagination.next_cursor of the previous page: the next page by keyset, as fast at any "
            "depth. It carries the filters and sort (repeating them is allowed, changing them is a 400); not with "
            "page."
        },
    )
    deleted = fields.Boolean(
        metadata={
            "description": "true: the deleted tasks instead (all of them for administrators, the ones you created "
            "for anyone else), to find one to restore."
        }
    )

    @post_load
    def cap_per_page(self, data, **kwargs):
        data["per_page"] = min(data["per_page"], MAX_PER_PAGE)
        return data


class FacetQuerySchema(TaskFilterSchema):
    """The facets' query string: the task list's filters, and how many entity names to list."""

    limit = QueryInteger(
        load_default=DEFAULT_FACET_LIMIT,
        validate=Range(min=1),
        metadata={"description": f"How many entity names, most used first; values above {MAX_FACET_LIMIT} are capped."},
    )

    @post_load
    def cap_limit(self, data, **kwargs):
        data["limit"] = min(data["limit"], MAX_FACET_LIMIT)
        return data


class HistoryQuerySchema(Schema):
    page = QueryInteger(load_default=1, validate=Range(min=1, max=MAX_PAGE))
    per_page = QueryInteger(
        load_default=50,
        validate=Range(min=1),
        metadata={"description": f"Values above {MAX_HISTORY_PER_PAGE} are capped."},
    )
    sort_order = Text(
        load_default="asc", validate=OneOf(("asc", "desc")), metadata={"description": "asc: oldest first."}
    )

    @post_load
    def cap_per_page(self, data, **kwargs):
        data["per_page"] = min(data["per_page"], MAX_HISTORY_PER_PAGE)
        return data


# What the API answers: the envelopes around the resources above (documented in the OpenAPI document, and
# checked against the answers to generated requests by tests/test_fuzz.py).


class ErrorSchema(Schema):
    error = fields.String(required=True)
    details = fields.Dict(
        required=True, metadata={"description": "For validation errors: field name -> messages.", "example": {}}
    )


class MessageSchema(Schema):
    message = fields.String(required=True)


class UserResponseSchema(Schema):
    user = fields.Nested(UserSchema, required=True)


class UserUpdatedSchema(MessageSchema, UserResponseSchema):
    pass


class UserListSchema(Schema):
    users = fields.List(fields.Nested(UserSchema), required=True)


class TokenPairSchema(Schema):
    access_token = fields.String(required=True, metadata={"description": "Send as 'Authorization: Bearer ...'."})
    refresh_token = fields.String(required=True, metadata={"description": "For POST /api/auth/refresh."})


class SessionSchema(UserUpdatedSchema, TokenPairSchema):
    pass


class PasswordChangedSchema(MessageSchema):
    sessions_ended = fields.Integer(required=True, metadata={"description": "Other sessions logged out."})


class TaskResponseSchema(Schema):
    task = fields.Nested(TaskSchema, required=True)


class TaskChangedSchema(MessageSchema, TaskResponseSchema):
    pass


class HistoryPaginationSchema(Schema):
    """Offset pagination: the history's, and the task list's without its cursor."""

    page = fields.Integer(required=True, metadata={"example": 1})
    per_page = fields.Integer(required=True, metadata={"example": 20})
    total = fields.Integer(required=True, metadata={"example": 1})
    pages = fields.Integer(required=True, metadata={"example": 1})
    has_next = fields.Boolean(required=True)
    has_prev = fields.Boolean(required=True)


class PaginationSchema(HistoryPaginationSchema):
    next_cursor = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "Pass as cursor= for the next page (keyset pagination); null on the last page."},
    )


class TaskEventSchema(Schema):
    id = fields.Integer(dump_only=True, required=True)
    task_id = fields.UUID(dump_only=True, required=True)
    occurred_at = Timestamp(dump_only=True, required=True)
    action = fields.String(dump_only=True, required=True, validate=OneOf(TASK_EVENT_ACTIONS))
    field = fields.String(
        dump_only=True,
        required=True,
        allow_none=True,
        metadata={"description": "The field an update or status change changed; null for the other actions."},
    )
    old_value = fields.Raw(
        dump_only=True, required=True, allow_none=True, metadata={"description": "As the API shows it."}
    )
    new_value = fields.Raw(
        dump_only=True,
        required=True,
        allow_none=True,
        metadata={"description": "As the API shows it; for created, the task's fields as created."},
    )
    actor_id = fields.UUID(dump_only=True, required=True, allow_none=True, metadata={"description": "Who did it."})
    actor = Person(
        dump_only=True, required=True, allow_none=True, metadata={"description": "Null if the account is gone."}
    )
    request_id = fields.String(
        dump_only=True, required=True, allow_none=True, metadata={"description": "X-Request-ID of the change."}
    )


class TaskHistorySchema(Schema):
    task_id = fields.UUID(required=True)
    events = fields.List(fields.Nested(TaskEventSchema), required=True)
    pagination = fields.Nested(HistoryPaginationSchema, required=True)


class TaskPageSchema(Schema):
    tasks = fields.List(fields.Nested(TaskSchema), required=True)
    pagination = fields.Nested(PaginationSchema, required=True)


class BulkStatusResultSchema(MessageSchema):
    updated = fields.Integer(required=True, metadata={"description": "How many tasks the ids named."})


class SummarySchema(Schema):
    total_tasks = fields.Integer(required=True)
    open_tasks = fields.Integer(required=True)
    closed_tasks = fields.Integer(required=True)


class TaskTypeCountSchema(Schema):
    type = fields.String(required=True, metadata={"example": "Call"})
    count = fields.Integer(required=True)


class AssigneeCountSchema(Schema):
    user = fields.String(required=True, metadata={"description": "Full name, or 'Unassigned'.", "example": "Jane Doe"})
    user_id = fields.UUID(required=True, allow_none=True)
    count = fields.Integer(required=True)


class DashboardSchema(Schema):
    """The dashboard: every figure for the tasks the filters select, as of one moment; all in UTC."""

    as_of = Timestamp(required=True, metadata={"description": "The moment the figures are for."})
    summary = fields.Nested(SummarySchema, required=True)
    task_types = fields.List(fields.Nested(TaskTypeCountSchema), required=True)
    user_tasks = fields.List(fields.Nested(AssigneeCountSchema), required=True)
    due = fields.Nested("DashboardDueSchema", required=True)
    closed = fields.Nested("DashboardClosedSchema", required=True)
    weekly = fields.List(
        fields.Nested("DashboardWeekSchema"),
        required=True,
        metadata={"description": "The last 12 weeks, oldest first; the last is the current week, so far."},
    )


class DashboardDueSchema(Schema):
    """Open tasks by due time (task_time), against as_of."""

    overdue = fields.Integer(required=True, metadata={"description": "Due before as_of."})
    today = fields.Integer(required=True, metadata={"description": "Due from as_of to the next UTC midnight."})
    next_7_days = fields.Integer(
        required=True, metadata={"description": "Due from as_of to 7 days later (today's included)."}
    )


class DashboardClosedSchema(Schema):
    """Tasks closed lately, and how long they took."""

    last_7_days = fields.Integer(required=True, metadata={"description": "Closed at or after as_of - 7 days."})
    last_30_days = fields.Integer(required=True, metadata={"description": "Closed at or after as_of - 30 days."})
    median_seconds_to_close = fields.Float(
        required=True,
        allow_none=True,
        metadata={
            "description": "Median of closed_at - date_created over the tasks closed in the last 30 days, in "
            "seconds; null if none was.",
            "example": 93600.0,
        },
    )


class DashboardWeekSchema(Schema):
    """One week of the series, from Monday 00:00 UTC."""

    week_start = fields.Date(required=True, metadata={"description": "The week's Monday (00:00 UTC)."})
    created = fields.Integer(required=True, metadata={"description": "Tasks created in the week."})
    closed = fields.Integer(required=True, metadata={"description": "Tasks closed in the week, and closed still."})


class FacetValueSchema(Schema):
    value = fields.String(required=True, metadata={"example": "Call"})
    count = fields.Integer(required=True, metadata={"description": "Live tasks with this value among the selected."})


class FacetAssigneeSchema(Schema):
    user_id = fields.UUID(required=True, allow_none=True, metadata={"description": "Null for unassigned tasks."})
    user = fields.String(required=True, metadata={"description": "Full name, or 'Unassigned'.", "example": "Jane Doe"})
    count = fields.Integer(required=True)


class FacetsSchema(Schema):
    task_types = fields.List(fields.Nested(FacetValueSchema), required=True)
    entity_names = fields.List(
        fields.Nested(FacetValueSchema), required=True, metadata={"description": "The first `limit` of them."}
    )
    entity_names_total = fields.Integer(
        required=True, metadata={"description": "How many distinct entity names the selected tasks have."}
    )
    assignees = fields.List(fields.Nested(FacetAssigneeSchema), required=True)


class HealthSchema(Schema):
    status = fields.String(required=True, validate=OneOf(("ok", "unavailable")))
    database = fields.String(required=True, validate=OneOf(("ok", "unavailable")))
    timestamp = Timestamp(required=True)
    version = fields.String(required=True)


class HealthUnavailableSchema(HealthSchema, ErrorSchema):
    pass


class MigrationStateSchema(Schema):
    current = fields.List(fields.String(), required=True, metadata={"description": "Revisions the database is at."})
    expected = fields.List(fields.String(), required=True, metadata={"description": "The migrations' latest."})


class ReadySchema(Schema):
    status = fields.String(required=True, validate=OneOf(("ready",)))
    database = fields.String(required=True, validate=OneOf(("ok",)))
    timestamp = Timestamp(required=True)
    version = fields.String(required=True)
    migration = fields.Nested(MigrationStateSchema, required=True)


class ReadyUnavailableSchema(ErrorSchema):
    status = fields.String(required=True, validate=OneOf(("unavailable",)))
    database = fields.String(required=True, validate=OneOf(("unavailable", "not migrated")))
    timestamp = Timestamp(required=True)
    version = fields.String(required=True)
    migration = fields.Nested(MigrationStateSchema)


def dump_page(schema: Schema, rows) -> list[dict]:
    """A page of tasks (or events), as ``schema.dump(rows, many=True)`` gives it, at a fraction of the cost: see
    ``page_dumper``. Each person on the page is dumped once (a page of 20 tasks names about a dozen people, twice
    each)."""
    if schema.only or schema.exclude:
        raise TypeError("A schema with only or exclude: dump it with marshmallow itself.")
    dump = page_dumper(type(schema))
    people = {}
    return [dump(row, people) for row in rows]


@cache
def page_dumper(schema_class: type[Schema]) -> Callable[[object, dict], dict]:
    """``dump(row, people)``: what ``schema_class().dump(row)`` gives, without marshmallow's generic steps around
    each value (finding the attribute by a dotted path, checking for a default, calling the field through its
    public wrapper), which cost more than the values' own conversions on a page of rows. The schema stays the one
    definition of the answer: its fields, in their order, under their data keys, each value converted by its
    field's own ``_serialize``. A ``Person`` is dumped once per id in ``people``. Schemas with dump hooks, or
    fields that take their value from elsewhere than an attribute, are not for this (an error says so).
    tests/test_schemas.py holds the output equal to ``schema.dump``."""
    schema = schema_class()
    if any(schema._hooks[hook] for hook in ("pre_dump", "post_dump")):
        raise TypeError(f"{schema_class.__name__} has dump hooks: dump it with marshmallow itself.")
    if schema.only or schema.exclude:
        raise TypeError(f"{schema_class.__name__} has only or exclude: dump it with marshmallow itself.")
    steps = []
    for name, field in schema.dump_fields.items():
        if isinstance(field, fields.Method | fields.Function | fields.Constant) or "." in (field.attribute or ""):
            raise TypeError(f"{schema_class.__name__}.{name} is not read from an attribute: dump it with marshmallow.")
        if isinstance(field, fields.Nested) and (field.only or field.exclude or not isinstance(field, Person)):
            raise TypeError(f"{schema_class.__name__}.{name} nests another way than Person: dump it with marshmallow.")
        nested = page_dumper(field.schema.__class__) if isinstance(field, Person) else None
        steps.append((field.data_key or name, field.attribute or name, field._serialize, nested))

    def dump(row, people: dict) -> dict:
        answer = {}
        for key, attribute, serialize, nested in steps:
            value = getattr(row, attribute)
            if nested is None:
                answer[key] = serialize(value, attribute, row)
            elif value is None:
                answer[key] = None
            elif (person := people.get(value.id)) is not None:
                answer[key] = person
            else:
                answer[key] = people[value.id] = nested(value, people)
        return answer

    return dump


class OutboxQuerySchema(Schema):
    state = Text(validate=OneOf(OUTBOX_STATES), metadata={"description": "Only messages in this state."})
    limit = QueryInteger(
        load_default=50, validate=Range(min=1, max=200), metadata={"description": "At most this many, newest first."}
    )


class OutboxMessageSchema(Schema):
    """A message in the outbox, for administrators: what it is, to whom, and how its sending goes. Its payload (a
    password-reset link, say) is never shown."""

    id = fields.UUID(dump_only=True, required=True)
    kind = fields.String(
        dump_only=True, required=True, metadata={"description": "What it is, e.g. the mail template's name."}
    )
    recipient = fields.String(dump_only=True, required=True)
    event_key = fields.String(dump_only=True, required=True, metadata={"description": "The event that caused it."})
    state = fields.String(dump_only=True, required=True, validate=OneOf(OUTBOX_STATES))
    attempts = fields.Integer(dump_only=True, required=True)
    next_attempt_at = Timestamp(
        dump_only=True,
        required=True,
        metadata={"description": "When it is tried next (pending), or when its sender's lease ends (sending)."},
    )
    last_error = fields.String(dump_only=True, required=True, allow_none=True)
    created_at = Timestamp(dump_only=True, required=True)
    sent_at = Timestamp(dump_only=True, required=True, allow_none=True)


class OutboxListSchema(Schema):
    messages = fields.List(fields.Nested(OutboxMessageSchema), required=True)


class OutboxMessageResponseSchema(Schema):
    message = fields.Nested(OutboxMessageSchema, required=True)


INVITATION_STATES = ("pending", "accepted", "revoked", "expired")


def one_time_token_field(**kwargs) -> Text:
    return Text(required=True, load_only=True, validate=Length(min=1, max=MAX_TOKEN_LENGTH), **kwargs)


class InvitationCreateSchema(Schema):
    """What an administrator sends to invite someone with ``POST /api/invitations``."""

    email = email_field(required=True, metadata={"example": "jdoe@example.com"})
    is_admin = JSONBoolean(load_default=False, metadata={"description": "Make the account an administrator."})
    full_name = full_name_field(
        allow_none=True, load_default=None, metadata={"description": "Greets them in the email.", "example": "Jane Doe"}
    )


class InvitationSchema(Schema):
    """An invitation as administrators see it; never its token."""

    id = fields.UUID(dump_only=True, required=True)
    email = fields.String(dump_only=True, required=True, metadata={"example": "jdoe@example.com"})
    full_name = fields.String(dump_only=True, required=True, allow_none=True, metadata={"example": "Jane Doe"})
    is_admin = fields.Boolean(dump_only=True, required=True)
    invited_by = Person(
        dump_only=True, required=True, allow_none=True, metadata={"description": "Null if the account is gone."}
    )
    created_at = Timestamp(dump_only=True, required=True)
    expires_at = Timestamp(dump_only=True, required=True)
    state = fields.String(dump_only=True, required=True, validate=OneOf(INVITATION_STATES))
    accepted_at = Timestamp(dump_only=True, required=True, allow_none=True)
    revoked_at = Timestamp(
        dump_only=True,
        required=True,
        allow_none=True,
        metadata={"description": "Revoked by an administrator, or replaced by a newer invitation to the address."},
    )


class InvitationQuerySchema(Schema):
    state = Text(validate=OneOf(INVITATION_STATES), metadata={"description": "Only invitations in this state."})
    limit = QueryInteger(
        load_default=50, validate=Range(min=1, max=200), metadata={"description": "At most this many, newest first."}
    )


class InvitationResponseSchema(MessageSchema):
    invitation = fields.Nested(InvitationSchema, required=True)


class InvitationListSchema(Schema):
    invitations = fields.List(fields.Nested(InvitationSchema), required=True)


class AcceptInvitationSchema(Schema):
    """What an invited person sends, with the token from their link, to create their account."""

    token = one_time_token_field(metadata={"description": "From the invitation's link."})
    username = username_field(required=True)
    full_name = full_name_field(
        metadata={"description": "Defaults to the name the administrator gave, if any.", "example": "Jane Doe"}
    )
    password = password_field(metadata={"example": "a-long-passphrase"})


class VerifyEmailSchema(Schema):
    token = one_time_token_field(metadata={"description": "From the verification link."})


class ResendVerificationSchema(Schema):
    email = email_field(required=True, metadata={"example": "jdoe@example.com"})


class RegisteredSchema(UserUpdatedSchema):
    """A registration's answer: the account and its first session's tokens, except with REGISTRATION=domain, where
    the account waits for its address to be verified (POST /api/auth/verify-email) and there are no tokens yet."""

    access_token = fields.String(metadata={"description": "Absent with REGISTRATION=domain."})
    refresh_token = fields.String(metadata={"description": "Absent with REGISTRATION=domain."})


class ForgotPasswordSchema(Schema):
    email = email_field(required=True, metadata={"example": "jdoe@example.com"})


class ResetPasswordSchema(Schema):
    token = one_time_token_field(metadata={"description": "From the password reset link."})
    password = password_field(metadata={"example": "a-new-long-passphrase"})


class EmailChangeSchema(Schema):
    """A new address for one's account, with the current password: a link to the new address confirms it."""

    email = email_field(required=True, metadata={"example": "admin@example.org"})
    password = Text(
        required=True,
        load_only=True,
        validate=Length(min=1, max=128),
        metadata={"description": "The current password.", "example": "admin123"},
    )


class EmailChangeConfirmSchema(Schema):
    token = one_time_token_field(metadata={"description": "From the confirmation link sent to the new address."})
