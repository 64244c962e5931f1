# FinStack Tasks, as production runs it: Render builds this image from render.yaml; any Docker host can run it.
# `docker build -t finstack-tasks .` then `docker run -p 10000:10000 --env-file prod.env finstack-tasks`.

# Builder: a virtualenv holding requirements.txt (the runtime only, never the dev tools). Every pinned package
# ships a wheel for Python 3.11 (psycopg2-binary included), so nothing is compiled: --only-binary makes a
# future pin without a wheel fail the build here instead of pulling a compiler in.
FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# --without-pip: the base image's pip installs into it, so the final venv carries no pip or setuptools.
RUN python -m venv --without-pip /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN pip --python /opt/venv/bin/python install --no-cache-dir --only-binary=:all: -r /tmp/requirements.txt

# Final: the base image, the venv and the app's code; no build tools, no caches, no tests, no secrets.
FROM python:3.11-slim
# APP_ENV=production: this image is the production artifact. A deployment that forgets a setting then stops with
# a message naming it, instead of running with development's defaults (the admin123 account, generated secrets).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    FLASK_APP=app \
    APP_ENV=production \
    PORT=10000
RUN groupadd --system --gid 10001 finstack \
    && useradd --system --uid 10001 --gid finstack --no-log-init --create-home --shell /usr/sbin/nologin finstack
WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
# Owned by root and read-only to the app's user: the running app cannot change its own code.
COPY *.py ./
COPY routes/ routes/
COPY migrations/ migrations/
COPY templates/ templates/
# Numeric, so that platforms enforcing "run as non-root" (Kubernetes' runAsNonRoot) can check it.
USER 10001:10001
# Render sets PORT (10000 unless told otherwise); gunicorn binds 0.0.0.0:$PORT by itself.
EXPOSE 10000
# For Docker and compose (Render probes render.yaml's healthCheckPath instead). No curl in a slim image: Python.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['PORT'] + '/api/health', timeout=4)"]
# Migrate (instances starting together take turns on a PostgreSQL lock), then exec: gunicorn replaces the shell,
# so it gets the platform's SIGTERM and finishes the requests in flight. gunicorn.conf.py is read from /app.
CMD ["sh", "-c", "flask db upgrade && exec gunicorn app:app"]
