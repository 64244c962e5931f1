"""`flask seed-demo`: demo users and tasks, added in batches, never mixed into other data unless forced."""

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

import commands
from app import create_app
from helpers import FAST_HASH, settings
from models import Task, User, db, task_counts

DEMO_EMAIL = "%@demo.finstack.example"


def seed(runner, *args: str):
    return runner.invoke(args=["seed-demo", *args])


def usernames(app, *conditions) -> list[str]:
    with app.app_context():
        return list(db.session.scalars(sa.select(User.username).where(*conditions).order_by(User.username)))


def task_count(app) -> int:
    with app.app_context():
        return db.session.scalar(sa.select(sa.func.count()).select_from(Task))


def tasks(app) -> list[Task]:
    with app.app_context():
        return list(db.session.scalars(sa.select(Task)).unique())


def task_signatures(app) -> Counter:
    """Each task's generated content, without its id and dates (which depend on the moment of the run)."""
    return Counter(
        (task.entity_name, task.task_type, task.note, task.contact_person_id, task.created_by_id) for task in tasks(app)
    )


def login(app, username: str, password: str):
    return app.test_client().post("/api/auth/login", json={"username": username, "password": password})


def test_seed_demo_creates_demo_users_and_tasks(app, runner):
    result = seed(runner, "--users", "5", "--tasks", "300", "--seed", "1")

    assert result.exit_code == 0, result.output
    assert "Seeded 300 tasks and 5 demo users (5 new)" in result.output
    assert usernames(app) == ["demo0001", "demo0002", "demo0003", "demo0004", "demo0005"]
    assert usernames(app, User.email.like(DEMO_EMAIL)) == usernames(app)
    assert task_count(app) == 300


def test_seed_demo_adds_to_earlier_demo_data_and_reuses_its_users(app, runner):
    assert seed(runner, "--users", "5", "--tasks", "100").exit_code == 0

    again = seed(runner, "--users", "5", "--tasks", "150")
    more_users = seed(runner, "--users", "7", "--tasks", "0")

    assert again.exit_code == 0, again.output
    assert "(0 new)" in again.output
    assert more_users.exit_code == 0, more_users.output
    assert "(2 new)" in more_users.output
    assert usernames(app) == [f"demo000{n}" for n in range(1, 8)]
    assert task_count(app) == 250


def test_seed_demo_makes_demo0001_the_only_administrator(app, runner):
    assert seed(runner, "--users", "3", "--tasks", "10").exit_code == 0

    assert usernames(app, User.is_admin) == ["demo0001"]


def test_demo_accounts_share_one_password_hashed_with_the_configured_method(app, runner):
    assert seed(runner, "--users", "3", "--tasks", "0").exit_code == 0

    with app.app_context():
        hashes = set(db.session.scalars(sa.select(User.password_hash)))
    assert len(hashes) == 1
    assert hashes.pop().startswith(f"{FAST_HASH}$")
    response = login(app, "demo0003", "demo-password")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["user"]["full_name"]


def test_seeded_tasks_read_back_through_the_api_with_their_counts(app, runner):
    assert seed(runner, "--users", "4", "--tasks", "250", "--seed", "5").exit_code == 0
    token = login(app, "demo0001", "demo-password").get_json()["access_token"]

    response = app.test_client().get("/api/tasks?per_page=100", headers={"Authorization": f"Bearer {token}"})

    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["pagination"]["total"] == 250
    assert len(body["tasks"]) == 100
    assert all(task["created_by"]["username"].startswith("demo") for task in body["tasks"])
    with app.app_context():  # the triggers on tasks counted every seeded row
        assert db.session.scalar(sa.select(sa.func.sum(task_counts.c.n))) == 250


def test_seeded_tasks_are_plausible(app, runner):
    before = datetime.now(UTC)
    assert seed(runner, "--users", "4", "--tasks", "400", "--seed", "3").exit_code == 0
    after = datetime.now(UTC)
    with app.app_context():
        demo_ids = set(db.session.scalars(sa.select(User.id)))

    seeded = tasks(app)

    assert len({task.id for task in seeded}) == 400
    assert all(task.id.version == 4 for task in seeded)
    assert {task.status for task in seeded} == {"open", "closed"}
    assert {task.created_by_id for task in seeded} == demo_ids
    assert {task.contact_person_id for task in seeded} == demo_ids | {None}
    assert 100 < sum(task.note is not None for task in seeded) < 220
    assert len({task.entity_name for task in seeded}) > 100
    assert len({task.task_type for task in seeded}) > 5
    oldest = before - timedelta(days=4 * 365 + 1)
    for task in seeded:
        assert oldest <= task.date_created <= after
        assert task.date_created <= task.updated_at <= after
        assert oldest - timedelta(days=3) <= task.task_time <= after + timedelta(days=200)
        assert task.entity_name == task.entity_name.strip() and task.entity_name


def test_seed_demo_with_the_same_seed_makes_the_same_tasks(app, runner):
    assert seed(runner, "--users", "3", "--tasks", "200", "--seed", "7").exit_code == 0
    first = task_signatures(app)

    assert seed(runner, "--users", "3", "--tasks", "200", "--seed", "7").exit_code == 0
    assert task_signatures(app) == first + first

    assert seed(runner, "--users", "3", "--tasks", "200", "--seed", "8").exit_code == 0
    assert task_signatures(app) != first + first + first


def test_seed_demo_writes_in_batches(app, runner, monkeypatch):
    monkeypatch.setattr(commands, "SEED_BATCH_SIZE", 64)

    result = seed(runner, "--users", "2", "--tasks", "200")

    assert result.exit_code == 0, result.output
    seeded = tasks(app)
    assert len({task.id for task in seeded}) == 200
    dates = sorted(task.date_created for task in seeded)
    assert dates[-1] - dates[0] > timedelta(days=365)  # each batch continues where the one before stopped


def test_seed_demo_refuses_a_database_with_other_users(app, runner, user):
    result = seed(runner, "--tasks", "10")

    assert result.exit_code == 1
    assert "not demo data" in result.output
    assert "--force" in result.output
    assert usernames(app) == ["alice"]
    assert task_count(app) == 0


def test_seed_demo_refuses_a_database_with_tasks_by_others(app, runner, admin):
    assert seed(runner, "--users", "2", "--tasks", "20").exit_code == 0
    with app.app_context():
        db.session.add(
            Task(
                entity_name="Real Client Ltd",
                task_type="Call",
                task_time=datetime(2025, 1, 15, 10, 0, tzinfo=UTC),
                created_by_id=uuid.UUID(admin["id"]),
            )
        )
        db.session.commit()

    result = seed(runner, "--users", "3", "--tasks", "10")

    assert result.exit_code == 1
    assert "1 task(s) not created by a demo account" in result.output
    assert "--force" in result.output
    assert usernames(app) == ["demo0001", "demo0002", "root"]
    assert task_count(app) == 21


def test_seed_demo_with_force_adds_to_other_data(app, runner, make_task):
    make_task()

    result = seed(runner, "--users", "2", "--tasks", "30", "--force")

    assert result.exit_code == 0, result.output
    assert usernames(app) == ["alice", "demo0001", "demo0002"]
    assert task_count(app) == 31


def test_seed_demo_with_force_stops_at_a_taken_demo_username(app, runner, make_user):
    make_user("demo0002", email="someone@example.com")

    result = seed(runner, "--users", "3", "--tasks", "30", "--force")

    assert result.exit_code == 1
    assert "is taken by another account" in result.output
    assert usernames(app) == ["demo0002"]
    assert task_count(app) == 0


def test_seed_demo_is_not_blocked_by_the_first_administrator(app, runner, admin):
    result = seed(runner, "--users", "2", "--tasks", "30")

    assert result.exit_code == 0, result.output
    assert usernames(app) == ["demo0001", "demo0002", "root"]
    assert task_count(app) == 30


def test_seed_demo_before_migrating_says_what_to_do(fresh_database_url, tmp_path):
    runner = create_app(settings(fresh_database_url, tmp_path)).test_cli_runner()

    result = seed(runner, "--tasks", "10")

    assert result.exit_code == 1
    assert "run `flask db upgrade` first" in result.output


def test_seed_demo_refuses_zero_users(app, runner):
    result = seed(runner, "--users", "0")

    assert result.exit_code == 2
    assert "--users" in result.output
    assert usernames(app) == []


def test_seed_demo_is_listed_in_flask_help(runner):
    result = runner.invoke(args=["--help"])

    assert "seed-demo" in result.output
    assert "Fill the database with demo users and tasks" in result.output
