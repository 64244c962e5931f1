"""The dashboard's figures: one statement over the task counts the database keeps, never a scan of the tasks."""

from flask import Blueprint
from sqlalchemy import Uuid, func, literal, null, select, union_all

from models import User, db, task_counts
from routes import require_login

bp = Blueprint("analytics", __name__, url_prefix="/api/analytics")
bp.before_request(require_login)

UNASSIGNED = "Unassigned"


def dashboard_figures() -> dict:
    """Totals by status, by task type and by assignee, in one round trip.

    ``task_counts`` holds a few rows per (status, type, assignee), kept exact by triggers on every write; the
    three groupings of it come back as one UNION ALL. Tasks whose assignee was deleted count as "Unassigned".
    """
    counts = task_counts.c
    total = func.sum(counts.n)
    no_user = null().cast(Uuid())
    rows = db.session.execute(
        union_all(
            select(literal("status"), counts.status, no_user, total).group_by(counts.status),
            select(literal("type"), counts.task_type, no_user, total).group_by(counts.task_type).having(total > 0),
            select(literal("user"), User.full_name, counts.contact_person_id, total)
            .select_from(task_counts)
            .outerjoin(User, User.id == counts.contact_person_id)
            .group_by(counts.contact_person_id, User.full_name)
            .having(total > 0),
        )
    ).all()
    by_status = {label: int(n) for kind, label, _, n in rows if kind == "status"}
    task_types = [(label, int(n)) for kind, label, _, n in rows if kind == "type"]
    assignees = [(label, user_id, int(n)) for kind, label, user_id, n in rows if kind == "user"]
    # Most first; ties by name, "Unassigned" after the people.
    task_types.sort(key=lambda row: (-row[1], row[0]))
    assignees.sort(key=lambda row: (-row[2], row[0] is None, row[0] or ""))
    return {
        "summary": {
            "total_tasks": sum(by_status.values()),
            "open_tasks": by_status.get("open", 0),
            "closed_tasks": by_status.get("closed", 0),
        },
        "task_types": [{"type": task_type, "count": n} for task_type, n in task_types],
        "user_tasks": [
            {"user": full_name or UNASSIGNED, "user_id": str(user_id) if user_id else None, "count": n}
            for full_name, user_id, n in assignees
        ],
    }


@bp.get("/dashboard")
def dashboard():
    """Summary counts, the task-type distribution and the per-assignee workload, exact and real-time.
    ---
    responses:
      200: {description: The dashboard., content: {application/json: {schema: DashboardSchema}}}
    """
    return dashboard_figures()
