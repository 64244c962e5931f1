"""The dashboard's figures, each computed by the database with an aggregate query."""

from flask import Blueprint
from sqlalchemy import func, select

from models import Task, User, db
from routes import require_login

bp = Blueprint("analytics", __name__, url_prefix="/api/analytics")
bp.before_request(require_login)

UNASSIGNED = "Unassigned"


def task_summary() -> dict:
    """Total, open and closed tasks in one pass."""
    total, open_tasks, closed_tasks = db.session.execute(
        select(
            func.count(),
            func.count().filter(Task.status == "open"),
            func.count().filter(Task.status == "closed"),
        ).select_from(Task)
    ).one()
    return {"total_tasks": total, "open_tasks": open_tasks, "closed_tasks": closed_tasks}


def task_type_counts() -> list[dict]:
    """Tasks per type, most common first."""
    count = func.count().label("count")
    rows = db.session.execute(
        select(Task.task_type, count).group_by(Task.task_type).order_by(count.desc(), Task.task_type)
    )
    return [{"type": task_type, "count": n} for task_type, n in rows]


def assignee_counts() -> list[dict]:
    """Tasks per assignee by full name; tasks whose assignee was deleted count as "Unassigned"."""
    count = func.count().label("count")
    rows = db.session.execute(
        select(User.id, User.full_name, count)
        .select_from(Task)
        .outerjoin(User, Task.contact_person_id == User.id)
        .group_by(User.id, User.full_name)
        .order_by(count.desc(), User.full_name.asc().nulls_last())
    )
    return [
        {"user": full_name or UNASSIGNED, "user_id": str(user_id) if user_id else None, "count": n}
        for user_id, full_name, n in rows
    ]


@bp.get("/dashboard")
def dashboard():
    """Summary counts, the task-type distribution and the per-assignee workload.
    ---
    responses:
      200: {description: The dashboard., content: {application/json: {schema: DashboardSchema}}}
    """
    return {"summary": task_summary(), "task_types": task_type_counts(), "user_tasks": assignee_counts()}
