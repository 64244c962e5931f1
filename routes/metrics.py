"""Prometheus metrics at ``/metrics`` (prometheus-flask-exporter): requests counted and timed by endpoint, method
and status, the database pool's connections in use, and the outbox (read from the database at each scrape). Under
gunicorn every worker writes its figures to files in PROMETHEUS_MULTIPROC_DIR (gunicorn.conf.py sets it up), so any
worker answers for all of them.

METRICS_ENABLED=false removes the route; METRICS_TOKEN, when set, must come as ``Authorization: Bearer <token>``
(production refuses to start with metrics on and no token)."""

import hmac
import math

from flask import Blueprint, Flask, Request, current_app, request
from prometheus_client import CollectorRegistry, Gauge
from prometheus_flask_exporter import PrometheusMetrics
from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError

import outbox
from models import db, utcnow
from routes.errors import APIError

bp = Blueprint("metrics", __name__)
COUNTED = "finstack_counted_in_use"
# Methods a label may name. gunicorn passes on any token as a method, and each new one would add series for good.
KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


def endpoint(req: Request) -> str:
    """The label requests are grouped by: the view's name (a bounded set, unlike paths with ids in them)."""
    return req.endpoint or "unmatched"


def init_metrics(app: Flask) -> None:
    """Count and time every request, watch the pool, and serve /metrics, when METRICS_ENABLED."""
    if not app.config["METRICS_ENABLED"]:
        return
    registry = CollectorRegistry()  # one per app: tests build many apps in one process
    exporter = PrometheusMetrics(app, path=None, registry=registry, group_by=endpoint, excluded_paths=["^/metrics$"])
    app.extensions["metrics"] = exporter
    app.before_request(skip_unknown_methods)
    watch_pool(app, registry)
    app.extensions["outbox_gauges"] = outbox_gauges(registry)
    app.register_blueprint(bp)


def skip_unknown_methods() -> None:
    """Requests with a made-up method (answered 405) are not counted: labels stay a bounded set."""
    if request.method not in KNOWN_METHODS:
        request.prom_do_not_track = True


def watch_pool(app: Flask, registry: CollectorRegistry) -> None:
    """Pool gauges summed over the live worker processes, kept by the pool's own check-out and check-in events
    (which outlive ``engine.dispose()``, as each gunicorn worker does after the fork)."""
    in_use = Gauge(
        "finstack_db_pool_connections_in_use",
        "Database connections checked out of the pool, over all live workers.",
        registry=registry,
        multiprocess_mode="livesum",
    )
    size = Gauge(
        "finstack_db_pool_size",
        "Connections each pool keeps open, summed over all live workers.",
        registry=registry,
        multiprocess_mode="livesum",
    )
    with app.app_context():
        engine = db.engine

    @event.listens_for(engine, "checkout")
    def checked_out(_dbapi_connection, record, _proxy):
        record.record_info[COUNTED] = True
        in_use.inc()
        size.set(getattr(engine.pool, "size", lambda: 1)())  # in-memory SQLite's StaticPool has one, unsized

    @event.listens_for(engine, "checkin")
    def checked_in(_dbapi_connection, record):
        # Also called for connections that failed on their way out (a pre-ping or a reconnect while the database
        # is away), which were never counted.
        if record.record_info.pop(COUNTED, False):
            in_use.dec()


DELIVERY_QUANTILES = {"0.5": 0.5, "0.95": 0.95, "1": 1.0}


def outbox_gauges(registry: CollectorRegistry) -> dict[str, Gauge]:
    """The outbox's gauges, set from the database as each scrape begins (``mostrecent``: under gunicorn, the worker
    that answered last has the latest figures)."""
    return {
        "messages": Gauge(
            "finstack_outbox_messages",
            "Outbox messages not sent yet, by state (retrying: pending again after a failed attempt).",
            ["state"],
            registry=registry,
            multiprocess_mode="mostrecent",
        ),
        "oldest_unsent_age": Gauge(
            "finstack_outbox_oldest_unsent_age_seconds",
            "Age of the oldest message still to send (0 when none is).",
            registry=registry,
            multiprocess_mode="mostrecent",
        ),
        "delivery_seconds": Gauge(
            "finstack_outbox_delivery_seconds",
            "Seconds from queueing to sending, over the messages sent in the last 5 minutes (NaN when none was).",
            ["quantile"],
            registry=registry,
            multiprocess_mode="mostrecent",
        ),
    }


def report_outbox(gauges: dict[str, Gauge]) -> None:
    """Set the outbox's gauges from the database; NaN while it cannot be read (down, or not migrated yet), so that a
    scrape still reports the requests, and no stale figure passes for a current one."""
    try:
        with db.engine.connect() as connection:  # back in the pool before the pool's gauges are read
            figures = outbox.figures(utcnow(), connection)
    except SQLAlchemyError as error:
        current_app.logger.warning("Outbox figures unavailable for /metrics: %s", error.__class__.__name__)
        figures = {"messages": dict.fromkeys(outbox.REPORTED_STATES, math.nan), "oldest_unsent_age": math.nan}
        figures["delivery_seconds"] = []
    for state, count in figures["messages"].items():
        gauges["messages"].labels(state).set(count)
    gauges["oldest_unsent_age"].set(figures["oldest_unsent_age"])
    delays = figures["delivery_seconds"]
    for label, fraction in DELIVERY_QUANTILES.items():
        value = delays[min(len(delays) - 1, int(fraction * len(delays)))] if delays else math.nan
        gauges["delivery_seconds"].labels(label).set(value)


@bp.get("/metrics")
def metrics():
    """Prometheus metrics in the text exposition format.

    Open unless METRICS_TOKEN is set; then that token is required as a bearer token.
    ---
    tags: [health]
    security: [{metricsToken: []}, {}]
    responses:
      200: {description: The metrics., content: {text/plain: {schema: {type: string}}}}
      401: {$ref: "#/components/responses/Unauthorized"}
    x-not: [429, 503]
    """
    token = current_app.config["METRICS_TOKEN"]
    if token:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), token.encode()):
            raise APIError("Metrics need 'Authorization: Bearer <METRICS_TOKEN>'.", 401)
    report_outbox(current_app.extensions["outbox_gauges"])
    body, content_type = current_app.extensions["metrics"].generate_metrics(request.headers.get("Accept"))
    return body, 200, {"Content-Type": content_type, "Cache-Control": "no-store"}
