import math
import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

import outbox
from app import create_app
from config import Config, ConfigError, check_production_settings
from helpers import assert_error, call, gunicorn, settings
from models import OutboxMessage, db, utcnow


def samples(text_format: str) -> dict[tuple, float]:
    """Every sample of a Prometheus text page, by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text_format)
        for sample in family.samples
    }


def request_count(page: dict, endpoint: str, status: str, method: str = "GET") -> float:
    labels = (("endpoint", endpoint), ("method", method), ("status", status))
    return page.get(("flask_http_request_duration_seconds_count", labels), 0)


def scrape(client, **headers) -> dict:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"].startswith("text/plain")
    return samples(response.get_data(as_text=True))


def test_requests_are_counted_and_timed_by_endpoint_and_status(client, auth_headers):
    for _ in range(3):
        client.get("/api/tasks", headers=auth_headers)
    client.get("/api/tasks")  # 401
    client.get("/api/no-such-thing")  # 404, no endpoint

    page = scrape(client)

    assert request_count(page, "tasks.list_tasks", "200") == 3
    assert request_count(page, "tasks.list_tasks", "401") == 1
    assert request_count(page, "unmatched", "404") == 1
    labels = (("endpoint", "tasks.list_tasks"), ("le", "+Inf"), ("method", "GET"), ("status", "200"))
    assert page[("flask_http_request_duration_seconds_bucket", labels)] == 3
    assert request_count(page, "metrics.metrics", "200") == 0  # scrapes are not counted


def test_made_up_methods_are_answered_but_not_counted(client):
    for method in ("FROBNICATE", "BREW", "GET"):
        client.open("/api/health", method=method)

    page = scrape(client)

    assert {dict(labels).get("method") for _, labels in page} - {None} == {"GET"}
    assert request_count(page, "health.health", "200") == 1


def test_metrics_work_on_an_in_memory_database(tmp_path):
    app = create_app(settings("sqlite://", tmp_path))  # one connection, in a pool with no size

    assert app.test_client().get("/api/health").status_code == 200
    assert scrape(app.test_client())[("finstack_db_pool_size", ())] == 1


def test_pool_connections_in_use_are_reported(fresh_database_url, tmp_path):
    app = create_app(settings(fresh_database_url, tmp_path))  # its own pool, not the suite's shared connection
    client = app.test_client()
    with app.app_context():
        db.session.execute(text("SELECT 1"))  # holds a connection until the context ends
        busy = scrape(client)
    idle = scrape(client)

    assert busy[("finstack_db_pool_connections_in_use", ())] == 1
    assert idle[("finstack_db_pool_connections_in_use", ())] == 0
    assert idle[("finstack_db_pool_size", ())] >= 1
    with app.app_context():
        db.engine.dispose()


@pytest.mark.app_config(METRICS_TOKEN="scrape-token-0123456789")
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", "Basic scrape-token-0123456789"])
def test_metrics_need_the_token_when_one_is_set(client, auth_headers, authorization):
    headers = {"Authorization": authorization} if authorization else {}

    assert_error(client.get("/metrics", headers=headers), 401)
    assert_error(client.get("/metrics", headers=auth_headers), 401)  # a user's token is not the metrics token
    assert scrape(client, Authorization="Bearer scrape-token-0123456789")


@pytest.mark.app_config(METRICS_ENABLED=False)
def test_metrics_can_be_switched_off(client):
    assert_error(client.get("/metrics"), 404)
    assert client.get("/api/health").status_code == 200


def test_production_refuses_open_metrics():
    config = Config({"APP_ENV": "production", "MAIL_BACKEND": "disabled"})
    with pytest.raises(ConfigError, match="METRICS_TOKEN must be set in production"):
        check_production_settings(vars(config) | {"RATELIMIT_STORAGE_URI": "redis://x"})
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        check_production_settings(vars(config) | {"METRICS_TOKEN": "guessable", "RATELIMIT_STORAGE_URI": "redis://x"})
    check_production_settings(vars(config) | {"METRICS_ENABLED": False, "RATELIMIT_STORAGE_URI": "redis://x"})
    check_production_settings(vars(config) | {"METRICS_TOKEN": "m" * 32, "RATELIMIT_STORAGE_URI": "redis://x"})


def test_two_apps_in_one_process_keep_their_own_figures(tmp_path):
    first = create_app(settings(f"sqlite:///{tmp_path / 'a.db'}", tmp_path))
    second = create_app(settings(f"sqlite:///{tmp_path / 'b.db'}", tmp_path))
    first.test_client().get("/api/health")

    assert request_count(scrape(first.test_client()), "health.health", "200") == 1
    assert request_count(scrape(second.test_client()), "health.health", "200") == 0


def test_every_gunicorn_worker_counts_in_one_page(servers, environment):
    access_log = ["--access-logfile", "-", "--access-logformat", "worker=%(p)s %(U)s %(s)s"]
    server = servers.start(gunicorn("--workers", "3", *access_log), environment)

    def ready(_):
        return call("GET", f"{server.url}/api/health/ready")[0]

    rounds = 0
    while len(set(re.findall(r"worker=<(\d+)> /api/health/ready 200", server.log.read_text()))) < 2 and rounds < 20:
        with ThreadPoolExecutor(max_workers=6) as pool:
            assert set(pool.map(ready, range(12))) == {200}
        rounds += 1
    # A worker logs a request once it has answered it: the last lines may come a moment after the answers.
    deadline = time.monotonic() + 10
    while len(answered := re.findall(r"worker=<(\d+)> /api/health/ready 200", server.log.read_text())) < 12 * rounds:
        assert time.monotonic() < deadline, f"{len(answered)} of {12 * rounds} requests logged"
        time.sleep(0.05)
    assert len(set(answered)) >= 2  # several processes served them

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        page = samples(response.read().decode())

    assert request_count(page, "health.ready", "200") == len(answered) == 12 * rounds


def test_the_outbox_is_reported_from_the_database_at_each_scrape(fresh_database_url, tmp_path):
    """Depth by state, the oldest unsent message's age, and delivery times: what the table holds when Prometheus asks
    (read on a connection of the scrape's own: a database of the test's own, with real commits), whichever worker on
    whichever machine sent (or did not send) the messages."""
    app = create_app(settings(fresh_database_url, tmp_path))
    with app.app_context():
        db.create_all()
    client = app.test_client()
    now = utcnow()
    page = scrape(client)
    assert [page[("finstack_outbox_messages", (("state", state),))] for state in ("pending", "sending", "failed")] == [
        0, 0, 0,
    ]  # fmt: skip
    assert page[("finstack_outbox_oldest_unsent_age_seconds", ())] == 0
    assert math.isnan(page[("finstack_outbox_delivery_seconds", (("quantile", "0.5"),))])

    def queued(key: str, minutes_ago: float) -> OutboxMessage:
        queued_at = now - timedelta(minutes=minutes_ago)
        message_id = outbox.add("password_reset", f"{key}@example.com", key, {"link": "x"}, queued_at)
        return db.session.get(OutboxMessage, message_id)

    with app.app_context():
        queued("waiting", 10)
        for key, delay in [("quick", 2), ("usual", 4), ("slow", 40)]:  # seconds from queueing to sending
            outbox.mark_sent(queued(key, 1), now - timedelta(minutes=1) + timedelta(seconds=delay))
        outbox.mark_sent(queued("backlogged", 8 * 60), now - timedelta(seconds=30))  # waited 8 hours: counts most
        outbox.mark_sent(queued("long-ago", 60 * 24), now - timedelta(hours=23))  # not sent in the last 5 minutes
        sending, retrying, failed = (queued(key, 3) for key in ("sending", "retrying", "failed"))
        db.session.commit()
        assert outbox.claim(sending.id, now) and outbox.claim(retrying.id, now) and outbox.claim(failed.id, now)
        outbox.mark_failed(retrying, "451 try again later", now)
        outbox.mark_failed(failed, "550 no such mailbox", now, permanent=True)
        db.session.commit()

    page = scrape(client)
    by_state = {
        state: page[("finstack_outbox_messages", (("state", state),))]
        for state in ("pending", "sending", "failed", "retrying")
    }
    assert by_state == {"pending": 2, "sending": 1, "failed": 1, "retrying": 1}
    assert 600 <= page[("finstack_outbox_oldest_unsent_age_seconds", ())] < 660
    delivery = {
        quantile: page[("finstack_outbox_delivery_seconds", (("quantile", quantile),))]
        for quantile in ("0.5", "0.95", "1")
    }
    backlogged = 8 * 3600 - 30
    assert delivery == {"0.5": 40, "0.95": backlogged, "1": backlogged}
    with app.app_context():
        db.engine.dispose()


def test_a_database_that_cannot_be_read_leaves_the_outbox_figures_unknown(fresh_database_url, tmp_path, caplog):
    app = create_app(settings(fresh_database_url, tmp_path))  # not migrated: no outbox table
    page = scrape(app.test_client())  # still a 200: the requests' figures are worth having

    assert math.isnan(page[("finstack_outbox_messages", (("state", "pending"),))])
    assert math.isnan(page[("finstack_outbox_oldest_unsent_age_seconds", ())])
    assert "Outbox figures unavailable for /metrics" in caplog.text
    with app.app_context():
        db.engine.dispose()
