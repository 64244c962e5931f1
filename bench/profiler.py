"""Where each request's time goes, by category: token check, limiter, SQL, ORM, dumping, JSON, logging, metrics,
middleware, view code. Written to bench/profile.md (committed: the profile behind the figures of bench/results.md).

Run by bench/run.py at the largest size, with the environment of the benchmarked gunicorn (production settings:
INFO request logs, limits in Redis, metrics), on the same seeded database:
    python bench/profiler.py SCENARIOS.json OUTPUT.md --requests 200 --seconds 10

For each scenario the app is called in-process through Flask's test client: a few requests to warm up, then up to
--requests (at most --seconds of them) timed without a profiler, then as many again under cProfile. Each function's
own time (tottime) is given to a category by the file it lives in (CATEGORIES below: a package, a module of the
standard library or of this project). A function that belongs to none (the standard library's re, uuid or
datetime, built-ins such as isinstance, redis and itsdangerous, which serve several callers) passes its time on to
its callers, in proportion to the time it spent for each, up to one that has a category: socket reads for Redis
count where Redis was called from, the signing of a list's cursor as view code. The test client's own work is
shown apart: a served request has gunicorn's instead.

cProfile adds a cost to every Python call, so the profiled time per request is above the unprofiled one, and more so
for Python-heavy parts than for the time spent waiting on PostgreSQL or Redis; the shares, not the absolute
figures, are what to compare. The raw profiles go to PREFIX-NAME.prof (for snakeviz or pstats).
"""

import argparse
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import sysconfig
import time
from datetime import UTC, datetime
from pathlib import Path

from sqltime import ROOT, Request  # first: it puts the project on sys.path

from app import create_app
from models import db

CATEGORIES = (
    "token check", "limiter", "SQL", "ORM", "dumping", "JSON", "logging", "metrics", "middleware", "view code", "other",
)  # fmt: skip
HARNESS = "test client"  # not part of a served request
COVERS = {
    "token check": "flask_jwt_extended, PyJWT, routes/auth.py (user lookup, revocation check)",
    "limiter": "flask_limiter, limits, routes/limits.py, and the Redis calls they make",
    "SQL": "psycopg2: executing, waiting for PostgreSQL, fetching, commit/rollback round trips",
    "ORM": "SQLAlchemy and Flask-SQLAlchemy outside the driver (compiling, pool, loading rows into objects), models.py",
    "dumping": "marshmallow and schemas.py (loading the query and body, dumping the answer)",
    "JSON": "encoding and decoding JSON: json, orjson, flask.json",
    "logging": "logging, python-json-logger, routes/logs.py (the request line)",
    "metrics": "prometheus_client, prometheus_flask_exporter, routes/metrics.py",
    "middleware": "Flask's dispatch, Werkzeug, Talisman, CORS, routes/errors.py, app.py, config.py",
    "view code": "the rest of routes/ (the views, validation, cursor signing)",
    "other": "time whose callers lead to none of the above",
}
PACKAGES = {
    "flask_jwt_extended": "token check",
    "jwt": "token check",
    "flask_limiter": "limiter",
    "limits": "limiter",
    "psycopg2": "SQL",
    "sqlalchemy": "ORM",
    "flask_sqlalchemy": "ORM",
    "marshmallow": "dumping",
    "orjson": "JSON",
    "pythonjsonlogger": "logging",
    "prometheus_client": "metrics",
    "prometheus_flask_exporter": "metrics",
    "flask_talisman": "middleware",
    "flask_cors": "middleware",
    "werkzeug": "middleware",
    "flask": "middleware",
}
SUBPACKAGES = {"flask/json/": "JSON", "flask/testing.py": HARNESS, "werkzeug/test.py": HARNESS}
STANDARD = {"json": "JSON", "logging": "logging"}
PROJECT = {
    "routes/auth.py": "token check",
    "routes/limits.py": "limiter",
    "routes/logs.py": "logging",
    "routes/metrics.py": "metrics",
    "routes/errors.py": "middleware",
    "app.py": "middleware",
    "config.py": "middleware",
    "models.py": "ORM",
    "schemas.py": "dumping",
}
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()
TOP = 15


def category(key: tuple) -> str | None:
    """The category of a function (pstats key: file, line, name) by where it lives; None to inherit its callers'."""
    filename, _, function = key
    if filename == "~":  # a built-in: the driver's and the JSON encoders' count; others serve their callers
        if "psycopg2" in function:
            return "SQL"
        return "JSON" if "_json." in function or "orjson" in function else None
    path = Path(filename)
    text = path.as_posix()
    if "/site-packages/" in text:
        inside = text.split("/site-packages/", 1)[1]
        for prefix, name in SUBPACKAGES.items():
            if inside.startswith(prefix):
                return name
        return PACKAGES.get(inside.split("/", 1)[0].removesuffix(".py"))
    if path.is_relative_to(STDLIB):
        return STANDARD.get(path.relative_to(STDLIB).parts[0].removesuffix(".py"))
    if path.is_relative_to(ROOT):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("bench/"):
            return HARNESS
        return PROJECT.get(relative, "view code" if relative.startswith("routes/") else None)
    return None


def shares(key: tuple, stats: dict, memo: dict, visiting: set) -> dict[str, float]:
    """How a function's own time divides between categories: its own, or its callers' in proportion to the time it
    spent for each (a call cycle without a category counts as other)."""
    if key in memo:
        return memo[key]
    own = category(key)
    if own:
        memo[key] = {own: 1.0}
        return memo[key]
    if key in visiting:
        return {"other": 1.0}
    visiting.add(key)
    callers = stats[key][4]
    weights = {caller: edge[2] for caller, edge in callers.items()}
    if not sum(weights.values()):
        weights = {caller: edge[1] for caller, edge in callers.items()}
    total = sum(weights.values())
    result: dict[str, float] = {}
    for caller, weight in weights.items():
        if weight and caller in stats:
            for name, part in shares(caller, stats, memo, visiting).items():
                result[name] = result.get(name, 0.0) + part * weight / total
    visiting.discard(key)
    memo[key] = result or {"other": 1.0}
    return memo[key]


def label(key: tuple) -> str:
    filename, line, function = key
    if filename == "~":
        return function
    text = Path(filename).as_posix()
    if "/site-packages/" in text:
        text = text.split("/site-packages/", 1)[1]
    elif Path(filename).is_relative_to(STDLIB):
        text = Path(filename).relative_to(STDLIB).as_posix()
    elif Path(filename).is_relative_to(ROOT):
        text = Path(filename).relative_to(ROOT).as_posix()
    return f"{text}:{line}({function})"


def attribute(stats: pstats.Stats, requests: int) -> tuple[dict[str, float], list[dict]]:
    """ms per request by category (the test client's own apart), and the functions with the most own time."""
    table = stats.stats
    memo: dict = {}
    totals = dict.fromkeys((*CATEGORIES, HARNESS), 0.0)
    functions = []
    for key, (_primitive, calls, own, _cumulative, _callers) in table.items():
        split = shares(key, table, memo, set())
        for name, part in split.items():
            totals[name] += own * part * 1000 / requests
        main = max(split, key=split.get)
        functions.append(
            {
                "function": label(key),
                "category": main if category(key) else f"{main} (callers')",
                "ms": own * 1000 / requests,
                "calls": calls / requests,
            }
        )
    functions.sort(key=lambda item: item["ms"], reverse=True)
    return totals, functions[:TOP]


def measure(app, scenario: dict, requests: int, seconds: float, prof_prefix: Path | None) -> dict:
    request = Request(app, scenario)
    for _ in range(3):  # warm-up: connections, compiled statements, caches
        request.send()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < requests and (len(times) < 5 or time.perf_counter() < deadline):
        started = time.perf_counter()
        request.send()
        times.append((time.perf_counter() - started) * 1000)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in times:
        request.send()
    profiler.disable()
    if prof_prefix:
        profiler.dump_stats(f"{prof_prefix}-{scenario['name']}.prof")
    totals, top = attribute(pstats.Stats(profiler), len(times))
    return {"requests": len(times), "median_ms": statistics.median(times), "totals": totals, "top": top}


def share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} %" if whole else "-"


def markdown(results: dict, scenarios: list[dict], tasks: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    )
    lines = [
        "# Where a request's time goes",
        "",
        f"Written by bench/profiler.py (run by `make bench` at its largest size) on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC} at commit {commit.stdout.strip()}"
        f"{' with uncommitted changes' if dirty.stdout.strip() else ''}, {tasks}, PostgreSQL and Redis on this "
        "machine, the app in-process with production's settings (`APP_ENV=production`, request log at INFO, limits "
        "in Redis, metrics). Each scenario's requests go through Flask's test client: first timed without a "
        "profiler (the median below), then as many again under cProfile. Every function's own time goes to the "
        "category of the file it lives in; functions of no category (the standard library's re, uuid, datetime, "
        "built-ins, redis, itsdangerous) pass theirs to their callers. cProfile's own cost inflates Python-heavy "
        "parts more than waiting on PostgreSQL or Redis: compare the shares; the raw profiles are in bench/out/.",
        "",
        "| Category | What it covers |",
        "|---|---|",
        *(f"| {name} | {COVERS[name]} |" for name in CATEGORIES),
        "",
        "## ms per request, by category (profiled)",
        "",
        "| Scenario | requests | unprofiled ms | profiled ms | " + " | ".join(CATEGORIES) + " |",
        "|---|--:|--:|--:|" + "--:|" * len(CATEGORIES),
    ]
    for scenario in scenarios:
        result = results[scenario["name"]]
        totals = result["totals"]
        whole = sum(totals[name] for name in CATEGORIES)
        lines.append(
            f"| `{scenario['name']}` | {result['requests']} | {result['median_ms']:.2f} | {whole:.2f} | "
            + " | ".join(f"{totals[name]:.2f}" for name in CATEGORIES)
            + " |"
        )
    for scenario in scenarios:
        result = results[scenario["name"]]
        totals = result["totals"]
        whole = sum(totals[name] for name in CATEGORIES)
        lines += [
            "",
            f"## `{scenario['name']}`: {scenario['method']} {scenario['path'][:120]}",
            "",
            f"{result['requests']} requests; {result['median_ms']:.2f} ms per request unprofiled (median, test client "
            f"included), {whole:.2f} ms profiled, besides {totals[HARNESS]:.2f} ms of the test client's own work.",
            "",
            "| Category | ms per request | share |",
            "|---|--:|--:|",
            *(
                f"| {name} | {totals[name]:.3f} | {share(totals[name], whole)} |"
                for name in sorted(CATEGORIES, key=totals.get, reverse=True)
                if totals[name] >= 0.0005
            ),
            "",
            f"Top {TOP} functions by own time (tottime):",
            "",
            "| Function | Category | ms per request | calls per request |",
            "|---|---|--:|--:|",
            *(
                f"| `{item['function'][:110]}` | {item['category']} | {item['ms']:.3f} | {item['calls']:.1f} |"
                for item in result["top"]
            ),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", type=Path, help="the scenarios as bench/run.py writes them (with a token)")
    parser.add_argument("output", type=Path, help="the Markdown report")
    parser.add_argument("--requests", type=int, default=200, help="requests per scenario (default 200)")
    parser.add_argument("--seconds", type=float, default=10, help="at most about this long per scenario, unprofiled")
    parser.add_argument("--prof-prefix", type=Path, help="raw profiles go to PREFIX-NAME.prof")
    parser.add_argument("--tasks", default="", help="the number of tasks, for the report")
    args = parser.parse_args()
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))  # callers' chains are followed recursively
    scenarios = json.loads(args.scenarios.read_text())
    app = create_app()
    results = {}
    try:
        for scenario in scenarios:
            results[scenario["name"]] = result = measure(app, scenario, args.requests, args.seconds, args.prof_prefix)
            totals = result["totals"]
            biggest = sorted(CATEGORIES, key=totals.get, reverse=True)[:3]
            print(
                f"  {scenario['name']:<15} {result['requests']:>4} requests, {result['median_ms']:7.2f} ms unprofiled; "
                + ", ".join(f"{name} {totals[name]:.2f}" for name in biggest),
                flush=True,
            )
    finally:
        with app.app_context():
            db.engine.dispose()
    tasks = f"{int(args.tasks):,} tasks" if args.tasks.isdigit() else "the benchmark's database"
    args.output.write_text(markdown(results, scenarios, tasks))


if __name__ == "__main__":
    main()
