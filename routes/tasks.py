"""Tasks: the calls, meetings and follow-ups logged against client entities."""

import uuid
from datetime import datetime

from flask import Blueprint, current_app, g, jsonify, request
from flask_jwt_extended import get_current_user
from itsdangerous import BadData, URLSafeSerializer
from marshmallow import ValidationError
from sqlalchemy import func, insert, literal, select, tuple_, update

from models import Task, TaskEvent, User, db, entity_name_counts, task_counts, utcnow
from routes import idempotency, load_args, load_json, require_login, unless_unchanged
from routes.errors import APIError
from schemas import (
    BulkStatusSchema,
    HistoryQuerySchema,
    TaskEventSchema,
    TaskQuerySchema,
    TaskSchema,
    TaskStatusSchema,
    TaskUpdateSchema,
    dump_page,
)

bp = Blueprint("tasks", __name__, url_prefix="/api/tasks")
bp.before_request(require_login)

task_schema = TaskSchema()
event_schema = TaskEventSchema()
# Text sorts ignore case, as people expect and as both databases then agree ("abc" beside "ABC Corp").
CASE_INSENSITIVE_SORTS = ("entity_name", "task_type")


FILTERS = ("status", "task_type", "entity_name", "contact_person_id", "created_from", "created_before")
# Filters that task_counts can answer: their totals need no COUNT over the tasks.
COUNTED_FILTERS = frozenset(("status", "task_type", "contact_person_id"))
# Filters that entity_name_counts can answer: the partial entity-name match among them, summed over a few thousand
# kept names instead of counted over the tasks it matches.
NAME_COUNTED_FILTERS = frozenset(("entity_name", "status"))
TIMESTAMP_SORTS = ("date_created", "task_time", "updated_at")


def task_filters(args: dict, columns=Task) -> list:
    """The WHERE conditions for the task list's filters (validated by ``TaskFilterSchema``), over ``Task`` or,
    for the counted filters, over ``task_counts.c`` or ``entity_name_counts.c`` (which count live tasks only): the
    same expressions, so that a kept row is selected exactly when its tasks are. Over ``Task``, deleted tasks
    are left out, unless ``deleted`` asks for them instead: all of them for an administrator, the caller's own
    for anyone else (the ones they may restore)."""
    conditions = []
    if columns is Task:
        if args.get("deleted"):
            conditions.append(Task.deleted_at.is_not(None))
            if not (user := get_current_user()).is_admin:
                conditions.append(Task.created_by_id == user.id)
        else:
            conditions.append(Task.deleted_at.is_(None))
    if "status" in args:
        conditions.append(columns.status == args["status"])
    if "task_type" in args:
        conditions.append(columns.task_type.icontains(args["task_type"], autoescape=True))
    if "entity_name" in args:
        conditions.append(columns.entity_name.icontains(args["entity_name"], autoescape=True))
    if "contact_person_id" in args:
        conditions.append(columns.contact_person_id == args["contact_person_id"])
    if "created_from" in args:
        conditions.append(columns.date_created >= args["created_from"])
    if "created_before" in args:
        conditions.append(columns.date_created < args["created_before"])
    return conditions


def task_total(args: dict):
    """A query for the exact number of tasks the filters select: from the kept counts when they can tell (task_counts
    first, the smaller, when both can: no filter, or the status), else a COUNT that the filters' indexes serve."""
    if not args.get("deleted"):
        given = {name for name in FILTERS if name in args}
        for counts, filters in ((task_counts, COUNTED_FILTERS), (entity_name_counts, NAME_COUNTED_FILTERS)):
            if filters >= given:
                return select(func.coalesce(func.sum(counts.c.n), 0)).where(*task_filters(args, counts.c))
    return select(func.count()).select_from(Task).where(*task_filters(args))


def sort_key(sort_by: str) -> list:
    """The list's ORDER BY columns, ascending; Task.id last, so ties come in a stable order and pages never
    overlap. Text sorts ignore case, as people expect and as both databases then agree."""
    column = getattr(Task, sort_by)
    return [func.lower(column), column, Task.id] if sort_by in CASE_INSENSITIVE_SORTS else [column, Task.id]


def cursor_serializer() -> URLSafeSerializer:
    # Signed, so a cursor is only ever one the API issued: its query is trusted and needs no second check.
    return URLSafeSerializer(current_app.config["SECRET_KEY"], salt="tasks-list-cursor")


def make_cursor(query: dict, sort_by: str, last: Task, page: int) -> str:
    """An opaque cursor for the page after ``last``: the query it belongs to, the sort value and id of the
    last row, and the number of the page it leads to."""
    value = getattr(last, sort_by)
    value = value.isoformat() if isinstance(value, datetime) else value
    return cursor_serializer().dumps({"query": query, "after": [value, str(last.id)], "page": page})


def read_cursor(token: str) -> dict:
    try:
        cursor = cursor_serializer().loads(token)
    except BadData:
        raise ValidationError(
            {"cursor": ["Not a cursor this API issued: pass pagination.next_cursor as is."]}
        ) from None
    return cursor


def after_cursor(args: dict, after: list):
    """The keyset condition: rows strictly after the cursor's row in the list's order."""
    sort_by = args["sort_by"]
    value, task_id = after
    if sort_by in TIMESTAMP_SORTS:
        value = datetime.fromisoformat(value)
    column = getattr(Task, sort_by)
    bound = literal(value, column.type)
    position = [func.lower(bound), bound] if sort_by in CASE_INSENSITIVE_SORTS else [bound]
    key, cursor_key = tuple_(*sort_key(sort_by)), tuple_(*position, literal(uuid.UUID(task_id), Task.id.type))
    return key < cursor_key if args["sort_order"] == "desc" else key > cursor_key


def list_query() -> tuple[dict, dict, dict | None]:
    """The list's validated arguments, its query string as the next cursor will carry it, and the cursor it
    follows if any. A cursor brings the query it was made for (page size included); the request may repeat
    those parameters but not change them, and may set another per_page."""
    args = load_args(TaskQuerySchema())
    if "cursor" not in args:
        return args, {name: value for name, value in request.args.items() if name != "page"}, None
    cursor = read_cursor(args.pop("cursor"))
    given = {name: value for name, value in request.args.items() if name not in ("cursor", "per_page")}
    if "page" in given:
        raise ValidationError({"page": ["Give page or cursor, not both."]})
    query = cursor["query"] | ({"per_page": request.args["per_page"]} if "per_page" in request.args else {})
    args = TaskQuerySchema().load(query)
    # Compared as loaded, so that repeating a default (sort_order=desc) or another spelling of a date is no change.
    changed = [name for name, value in given.items() if TaskQuerySchema().load(query | {name: value}) != args]
    if changed:
        message = "Differs from the query this cursor belongs to: drop it, or start again without cursor."
        raise ValidationError({name: [message] for name in changed})
    return args, query, cursor


def may_change(user: User, creator_id: uuid.UUID | None, assignee_id: uuid.UUID | None) -> bool:
    """Tasks are visible to the whole team; their creator, their assignee and administrators change them."""
    return user.is_admin or user.id in (creator_id, assignee_id)


def locked_task(task_id: uuid.UUID) -> Task:
    """The task, deleted or not, locked until the commit: concurrent changes of it wait their turn, and each sees
    it as the one before left it. A 404 if there is no such task.

    The lock is taken alone, then the task read with its people in a statement of its own: on PostgreSQL a
    locking read that waited rechecks the task's new row against the users it had read before the wait, so
    joined in, a new assignee or closer would come out as null."""
    if db.session.scalar(select(Task.id).where(Task.id == task_id).with_for_update()) is None:
        raise APIError("Task not found.", 404)
    return db.session.get(Task, task_id, populate_existing=True)


def task_for_update(task_id: uuid.UUID) -> Task:
    """The live task, locked, if the caller may change it and it is still the version If-Match names."""
    task = locked_task(task_id)
    if task.deleted_at is not None:
        raise APIError("Task not found.", 404)
    if not may_change(get_current_user(), task.created_by_id, task.contact_person_id):
        raise APIError("Only the task's creator, its assignee or an administrator can change this task.", 403)
    check_version(task)
    return task


def check_version(task: Task) -> None:
    """``If-Match``: the change applies only to the version the client read, else a 412 with the task as it is
    now. Without the header, the last write wins, as the existing client expects."""
    if "If-Match" in request.headers and not request.if_match.contains(str(task.version)):
        raise APIError(
            f"The task has changed since you read it: it is at version {task.version}. Reload it, then try again.",
            412,
            {"task": task_schema.dump(task), "version": task.version},
            {"ETag": f'"{task.version}"'},
        )


def with_etag(body: dict, task: Task, status: int = 200):
    """The JSON response, tagged with the task's version for a later If-Match."""
    response = jsonify(body)
    response.status_code = status
    response.set_etag(str(task.version))
    return response


def audit_value(value):
    """A field's value in the trail, as the API shows it."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def record(task_id: uuid.UUID, action: str, now: datetime, field: str | None = None, old=None, new=None) -> None:
    """Add an event to the trail, in the transaction of the change it records."""
    db.session.add(
        TaskEvent(
            task_id=task_id,
            occurred_at=now,
            actor_id=get_current_user().id,
            action=action,
            field=field,
            old_value=audit_value(old),
            new_value=audit_value(new),
            request_id=g.get("request_id"),
        )
    )


def set_status(task: Task, status: str, now: datetime) -> None:
    """Open or close the task; closing stamps when and by whom, opening clears both."""
    closing = status == "closed"
    task.status = status
    task.closed_at = now if closing else None
    task.closed_by = get_current_user() if closing else None


def active_user(user_id: uuid.UUID) -> User:
    """The assignee named by ``contact_person_id``; unknown or deactivated users are a 400."""
    user = db.session.get(User, user_id)
    if user is None or not user.is_active:
        raise ValidationError({"contact_person_id": ["No active user has this id."]})
    return user


@bp.get("")
def list_tasks():
    """A page of tasks, filtered and sorted as the query string asks.

    The answer carries an ETag of its bytes: send it back as If-None-Match to get a 304 without a body while the
    page is still the same (for polling clients).
    ---
    parameters: [{in: query, schema: TaskQuerySchema}, IfNoneMatch]
    responses:
      200:
        description: A page of tasks.
        headers: {ETag: {description: "An ETag of the page.", schema: {type: string}}}
        content: {application/json: {schema: TaskPageSchema}}
      304:
        description: The page is as the one whose ETag was sent; no body.
        headers: {ETag: {description: "The same ETag.", schema: {type: string}}}
      400: {$ref: "#/components/responses/BadRequest"}
    """
    args, query, cursor = list_query()
    per_page = args["per_page"]
    stmt = select(Task).where(*task_filters(args))
    if cursor is None:
        page = args["page"]
        stmt = stmt.offset((page - 1) * per_page)
    else:
        page = cursor["page"]
        stmt = stmt.where(after_cursor(args, cursor["after"]))
    descending = args["sort_order"] == "desc"
    order = [key.desc() if descending else key.asc() for key in sort_key(args["sort_by"])]
    # One row more than the page tells whether a next page exists, whatever the total says by now. The total
    # comes with each row, counted in the same statement (one round trip, one snapshot); alone past the last page.
    total = task_total(args)
    rows = db.session.execute(stmt.add_columns(total.scalar_subquery()).order_by(*order).limit(per_page + 1)).all()
    tasks, has_next = [row[0] for row in rows[:per_page]], len(rows) > per_page
    total = rows[0][1] if rows else db.session.scalar(total)
    response = jsonify(
        {
            "tasks": dump_page(task_schema, tasks),
            "pagination": {
                "page": page,
                "per_page": per_page,
                "total": total,
                "pages": -(-total // per_page),
                "has_next": has_next,
                "has_prev": page > 1,
                "next_cursor": make_cursor(query, args["sort_by"], tasks[-1], page + 1) if has_next else None,
            },
        }
    )
    response.add_etag()  # the page's bytes are the same for the same page: a cursor's signature has no time in it
    return unless_unchanged(response)


def creation_values(task: Task) -> dict:
    """What a task was created with, as the trail's ``created`` event keeps it."""
    fields = ("entity_name", "task_type", "task_time", "contact_person_id", "note", "status")
    return {field: audit_value(getattr(task, field)) for field in fields}


@bp.post("")
def create_task():
    """Log a task, created by the caller and assigned to an active user.
    ---
    parameters: [IdempotencyKey]
    requestBody: {required: true, content: {application/json: {schema: TaskSchema}}}
    responses:
      201:
        description: The task as stored.
        headers: {ETag: ETag}
        content: {application/json: {schema: TaskChangedSchema}}
      422: {$ref: "#/components/responses/KeyReused"}
    """
    data = load_json(TaskSchema())
    if (replay := idempotency.replay_or_claim()) is not None:
        return replay
    contact_person = active_user(data.pop("contact_person_id"))
    now = utcnow()
    task = Task(**data, contact_person=contact_person, created_by=get_current_user(), date_created=now, updated_at=now)
    set_status(task, data.get("status", "open"), now)
    db.session.add(task)
    db.session.flush()  # its id and version, for the trail and the response
    record(task.id, "created", now, new=creation_values(task))
    response = idempotency.remember(with_etag({"message": "Task created.", "task": task_schema.dump(task)}, task, 201))
    db.session.commit()
    return response


@bp.get("/<uuid:task_id>")
def get_task(task_id: uuid.UUID):
    """One task.
    ---
    responses:
      200:
        description: The task.
        headers: {ETag: ETag}
        content: {application/json: {schema: TaskResponseSchema}}
      404: {$ref: "#/components/responses/NotFound"}
    """
    task = db.session.scalar(select(Task).where(Task.id == task_id, Task.deleted_at.is_(None)))
    if task is None:
        raise APIError("Task not found.", 404)
    return with_etag({"task": task_schema.dump(task)}, task)


@bp.put("/<uuid:task_id>")
def update_task(task_id: uuid.UUID):
    """Change any subset of a task's fields; ``note: null`` clears the note.

    The task's creator, its assignee or an administrator may change it. Each field that changes is recorded in
    the task's history; a request that changes nothing records nothing and keeps the version.
    ---
    parameters: [IfMatch]
    requestBody: {required: true, content: {application/json: {schema: TaskUpdateSchema}}}
    responses:
      200:
        description: The task as changed.
        headers: {ETag: ETag}
        content: {application/json: {schema: TaskChangedSchema}}
      403: {$ref: "#/components/responses/Forbidden"}
      404: {$ref: "#/components/responses/NotFound"}
      412: {$ref: "#/components/responses/PreconditionFailed"}
    """
    data = load_json(TaskUpdateSchema())
    if not data:
        raise APIError("Nothing to update: send at least one task field.")
    task = task_for_update(task_id)
    now = utcnow()
    # One UPDATE at the commit, so one more version: a lookup (the assignee's) must not flush half the changes.
    with db.session.no_autoflush:
        for field, new in data.items():
            old = getattr(task, field)
            if old == new:
                continue
            record(task.id, "status_changed" if field == "status" else "updated", now, field, old, new)
            if field == "contact_person_id":
                task.contact_person = active_user(new)
            elif field == "status":
                set_status(task, new, now)
            else:
                setattr(task, field, new)
            task.updated_at = now
    db.session.commit()
    return with_etag({"message": "Task updated.", "task": task_schema.dump(task)}, task)


@bp.patch("/<uuid:task_id>/status")
def update_task_status(task_id: uuid.UUID):
    """Open or close a task.

    The task's creator, its assignee or an administrator may change it. Closing sets closed_at and closed_by,
    opening clears them.
    ---
    parameters: [IfMatch]
    requestBody: {required: true, content: {application/json: {schema: TaskStatusSchema}}}
    responses:
      200:
        description: The task as changed.
        headers: {ETag: ETag}
        content: {application/json: {schema: TaskChangedSchema}}
      403: {$ref: "#/components/responses/Forbidden"}
      404: {$ref: "#/components/responses/NotFound"}
      412: {$ref: "#/components/responses/PreconditionFailed"}
    """
    status = load_json(TaskStatusSchema())["status"]
    task = task_for_update(task_id)
    if task.status != status:
        now = utcnow()
        record(task.id, "status_changed", now, "status", task.status, status)
        set_status(task, status, now)
        task.updated_at = now
    db.session.commit()
    return with_etag({"message": f"Task marked {task.status}.", "task": task_schema.dump(task)}, task)


@bp.patch("/bulk-status")
def bulk_update_status():
    """Open or close up to 1000 tasks at once, in one UPDATE; nothing changes if any id is unknown.

    All or nothing: an unknown (or deleted) id is a 404 naming the ids (details.not_found), a task the caller
    may not change a 403 naming them (details.forbidden). Each task whose status changes gets an event in its
    history.
    ---
    parameters: [IdempotencyKey]
    requestBody: {required: true, content: {application/json: {schema: BulkStatusSchema}}}
    responses:
      200: {description: How many tasks were set., content: {application/json: {schema: BulkStatusResultSchema}}}
      403: {$ref: "#/components/responses/Forbidden"}
      404: {$ref: "#/components/responses/NotFound"}
      422: {$ref: "#/components/responses/KeyReused"}
    """
    data = load_json(BulkStatusSchema())
    if (replay := idempotency.replay_or_claim()) is not None:
        return replay
    task_ids = list(dict.fromkeys(data["task_ids"]))
    status = data["status"]
    # Lock the rows in id order first: overlapping bulk updates queue instead of deadlocking, and the
    # timestamp below is taken after any edit that committed while this request waited.
    locked = (
        select(Task.id, Task.created_by_id, Task.contact_person_id, Task.status)
        .where(Task.id.in_(task_ids), Task.deleted_at.is_(None))
        .order_by(Task.id)
        .with_for_update()
    )
    rows = db.session.execute(locked).all()
    found = {row.id for row in rows}
    missing = [str(task_id) for task_id in task_ids if task_id not in found]
    if missing:
        raise APIError(
            f"No task found for {len(missing)} of the ids; nothing was changed.", 404, {"not_found": missing}
        )
    user = get_current_user()
    refused = {row.id for row in rows if not may_change(user, row.created_by_id, row.contact_person_id)}
    if refused:
        raise APIError(
            f"You may not change {len(refused)} of these tasks (only their creator, assignee or an administrator "
            "can); nothing was changed.",
            403,
            {"forbidden": [str(task_id) for task_id in task_ids if task_id in refused]},
        )
    # Tasks already in that status are left alone (their updated_at and version included): nothing changed.
    changing = [row for row in rows if row.status != status]
    if changing:
        now, closing = utcnow(), status == "closed"
        db.session.execute(
            update(Task)
            .where(Task.id.in_([row.id for row in changing]))
            .values(
                status=status,
                updated_at=now,
                closed_at=now if closing else None,
                closed_by_id=user.id if closing else None,
                version=Task.version + 1,
            )
            .execution_options(synchronize_session=False)
        )
        db.session.execute(
            insert(TaskEvent),
            [
                {
                    "task_id": row.id,
                    "occurred_at": now,
                    "actor_id": user.id,
                    "action": "bulk_status_changed",
                    "field": "status",
                    "old_value": row.status,
                    "new_value": status,
                    "request_id": g.get("request_id"),
                }
                for row in changing
            ],
        )
    response = jsonify(message=f"Status set to {status} for {len(found)} task(s).", updated=len(found))
    idempotency.remember(response)
    db.session.commit()
    return response


@bp.delete("/<uuid:task_id>")
def delete_task(task_id: uuid.UUID):
    """Delete a task (its creator or an administrator): hidden everywhere until restored or purged.

    Of two deletes at once, one gets a 404. The task stays in the database, with its history, until
    ``flask purge-deleted`` removes it.
    ---
    parameters: [IfMatch]
    responses:
      200:
        description: Deleted.
        headers: {ETag: ETag}
        content: {application/json: {schema: MessageSchema}}
      403: {$ref: "#/components/responses/Forbidden"}
      404: {$ref: "#/components/responses/NotFound"}
      412: {$ref: "#/components/responses/PreconditionFailed"}
    """
    task = locked_task(task_id)
    if task.deleted_at is not None:
        raise APIError("Task not found.", 404)
    user = get_current_user()
    if not (user.is_admin or task.created_by_id == user.id):
        raise APIError("Only the task's creator or an administrator can delete this task.", 403)
    check_version(task)
    now = utcnow()
    record(task.id, "deleted", now)
    task.deleted_at = task.updated_at = now
    db.session.commit()
    return with_etag({"message": "Task deleted."}, task)  # the version a conditional restore names


@bp.post("/<uuid:task_id>/restore")
def restore_task(task_id: uuid.UUID):
    """Bring a deleted task back (its creator or an administrator), as it was when deleted.

    For anyone else a deleted task does not exist: a 404.
    ---
    parameters: [IfMatch]
    responses:
      200:
        description: The task, restored.
        headers: {ETag: ETag}
        content: {application/json: {schema: TaskChangedSchema}}
      403: {$ref: "#/components/responses/Forbidden"}
      404: {$ref: "#/components/responses/NotFound"}
      409: {$ref: "#/components/responses/Conflict"}
      412: {$ref: "#/components/responses/PreconditionFailed"}
    """
    task = locked_task(task_id)
    user = get_current_user()
    if task.deleted_at is None:
        raise APIError("This task is not deleted: there is nothing to restore.", 409)
    if not (user.is_admin or task.created_by_id == user.id):  # deleted tasks are hidden from them: not found
        raise APIError("Task not found.", 404)
    check_version(task)
    now = utcnow()
    record(task.id, "restored", now)
    task.deleted_at, task.updated_at = None, now
    db.session.commit()
    return with_etag({"message": "Task restored.", "task": task_schema.dump(task)}, task)


@bp.get("/<uuid:task_id>/history")
def task_history(task_id: uuid.UUID):
    """A task's history: every change to it, who made it and when, oldest first.

    Anyone may read a task's history; that of a deleted (or purged) task, administrators only.
    ---
    parameters: [{in: query, schema: HistoryQuerySchema}]
    responses:
      200: {description: A page of events., content: {application/json: {schema: TaskHistorySchema}}}
      400: {$ref: "#/components/responses/BadRequest"}
      404: {$ref: "#/components/responses/NotFound"}
    """
    args = load_args(HistoryQuerySchema())
    page, per_page = args["page"], args["per_page"]
    live = db.session.scalar(select(Task.deleted_at.is_(None)).where(Task.id == task_id))
    if not live and not get_current_user().is_admin:
        raise APIError("Task not found.", 404)
    order = TaskEvent.id.desc() if args["sort_order"] == "desc" else TaskEvent.id.asc()
    events = db.session.scalars(
        select(TaskEvent)
        .where(TaskEvent.task_id == task_id)
        .order_by(order)
        .offset((page - 1) * per_page)
        .limit(per_page)
    ).all()
    total = db.session.scalar(select(func.count()).select_from(TaskEvent).where(TaskEvent.task_id == task_id))
    if live is None and total == 0:
        raise APIError("Task not found.", 404)
    return {
        "task_id": str(task_id),
        "events": dump_page(event_schema, events),
        "pagination": {
            "page": page,
            "per_page": per_page,
            "total": total,
            "pages": -(-total // per_page),
            "has_next": page * per_page < total,
            "has_prev": page > 1,
        },
    }
