"""The Celery app, built from ``create_app`` as Flask's Celery pattern shows (jobs.celery_init_app), for the
workers and beat: ``celery -A celery_app worker`` sends what the outbox holds, ``celery -A celery_app beat`` runs
the sweep every minute (one beat for the whole deployment). Settings come from the environment, as the API's do."""

from app import configuration_errors_as_one_line, create_app, load_env_file

load_env_file()
with configuration_errors_as_one_line():
    flask_app = create_app()
celery_app = flask_app.extensions["celery"]
