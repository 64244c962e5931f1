"""`make soak`: minutes of mixed traffic against gunicorn as production runs it; memory per worker must stay flat
and no request may fail. Writes bench/soak.md, bench/soak.png and the soak section of bench/results.md.

    .venv/bin/python bench/soak.py                 # 100k tasks, 180 s of traffic from 8 clients: about 4 minutes
    .venv/bin/python bench/soak.py --seconds 600   # a longer soak
    .venv/bin/python bench/soak.py --quick         # 20k tasks, 30 s: a smoke run, written to bench/out/soak/

It reuses bench/run.py's pieces: a scratch PostgreSQL database (finstack_soak, dropped afterwards), migrated with
`flask db upgrade` and seeded with `flask seed-demo`; the app in production settings with rate limits counted in
Redis (raised far above the load, under a key prefix of its own, removed afterwards); gunicorn started from
gunicorn.conf.py (2 sync workers, preloaded app) on 127.0.0.1. wrk (bench/soak.lua) then cycles through a
weighted mix of requests: lists with filters, sorts, offset and cursor pages, single tasks, creates, updates,
status changes, bulk status changes, deletes of the soak's own creations, the dashboard and health.

The load runs as back-to-back wrk runs of --interval seconds (gunicorn's sync workers close every connection
anyway, so the seams change nothing for the server). After each, every gunicorn worker's memory is read from
/proc/<pid>/smaps_rollup (RSS, PSS and USS, the pages only that process holds), found as the children of the
gunicorn master, together with req/s, errors and latency for the interval and the load average.

Verdicts (any failing one makes the exit status 1):
- errors: not one answer outside 2xx and not one socket error or timeout;
- memory: for each worker, after a warm-up of the first --warmup-share of its life (20 %), its RSS grows by less
  than --max-growth MiB (4) to the end, and the least-squares slope of its RSS over that part is below
  --max-slope MiB/min (1; only judged over 60 s or more);
- workers: none replaced. gunicorn.conf.py recycles a worker after 20,000 +- 2,000 requests, which this load
  reaches in about 90 s; the soak turns that off (--max-requests 0) so each worker lives the whole run and the
  judgement covers a whole life instead of being reset by recycling. A worker that changes pid anyway crashed or
  was killed for a timeout, and fails the run. --recycle keeps production's recycling: each worker pid is then
  judged on its own life, and recycles are counted.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import report
import run
from run import BenchError, log

BENCH, ROOT = run.BENCH, run.ROOT
OUT = run.OUT / "soak"
LUA = BENCH / "soak.lua"
DATABASE_PREFIX = "finstack_soak"
GUNICORN_KEYS = (*run.GUNICORN_KEYS, "max_requests", "max_requests_jitter")
CREATE_MARK = "Soak Create Co"
SLOPE_MIN_SPAN_S = 60  # a slope over less than a minute says more about noise than about a leak
MIN_JUDGED_SAMPLES = 4
MIB = 1024 * 1024

# The request mix: weight (share of requests, per cent) and what each kind sends. Reads dominate, as in the
# Angular client (a list per screen, a task when one is opened); every write kind is in, and every create is
# followed, sooner or later, by a delete of one of the soak's own tasks, so the table keeps its size.
MIX = {
    "list_default": (14, "GET /api/tasks (page 1, the Angular client's first call)"),
    "list_filter": (18, "GET /api/tasks with status, assignee, task type, partial entity name, date range, combined"),
    "list_sort": (8, "GET /api/tasks?sort_by=...&sort_order=... (every sort field, both orders)"),
    "list_page": (6, "GET /api/tasks?page=2..50&per_page=10, 20, 50 or 100"),
    "cursor_page": (10, "GET /api/tasks?cursor=... (next_cursor of pages 1-15 of five queries)"),
    "task_get": (12, "GET /api/tasks/<id> (3,000 seeded tasks)"),
    "create": (6, "POST /api/tasks"),
    "delete_own": (6, "DELETE /api/tasks/<id of a task the soak created>"),
    "update": (5, "PUT /api/tasks/<id> (note, note: null, task_time or assignee)"),
    "status_patch": (5, "PATCH /api/tasks/<id>/status (open or closed)"),
    "bulk_status": (2, "PATCH /api/tasks/bulk-status (10, 50 or 200 ids)"),
    "dashboard": (3, "GET /api/analytics/dashboard"),
    "health": (3, "GET /api/health"),
    "me": (1, "GET /api/auth/me"),
    "users": (1, "GET /api/users"),
}
MIX_LINES = 1000  # each kind appears weight x 10 times, shuffled


# -- the request mix ------------------------------------------------------------------------------------------


def build_mix(server: run.Server, database: run.Database, token: str, rng: random.Random) -> tuple[list, dict]:
    """The shuffled lines of the mix (name, method, path, body) and the users whose ids a created task shows."""
    total = database.task_count()
    pool = [str(row[0]) for row in database.query("SELECT id FROM tasks ORDER BY md5(id::text) LIMIT 3000")]
    if len(pool) < 1000:
        raise BenchError(f"The soak needs at least 1,000 tasks, not {total:,}.")
    assignees = [
        str(row[0])
        for row in database.query(
            "SELECT contact_person_id FROM tasks WHERE contact_person_id IS NOT NULL "
            "GROUP BY contact_person_id ORDER BY count(*) DESC, contact_person_id LIMIT 5"
        )
    ]
    types = [row[0] for row in database.query("SELECT task_type FROM tasks GROUP BY 1 ORDER BY count(*) DESC")]
    entities = [row[0] for row in database.query("SELECT entity_name FROM tasks GROUP BY 1 ORDER BY count(*) DESC")]
    fragments = sorted({run.partial_fragment(name) for name in entities[:8]})
    quantile = "SELECT date_created FROM tasks ORDER BY date_created OFFSET %s LIMIT 1"
    dates = [database.scalar(quantile, (int(total * share),)).date().isoformat() for share in (0.2, 0.3, 0.6, 0.7)]
    admin_id = run.checked(server, "GET", "/api/auth/me", token)["user"]["id"]
    users = [admin_id, *assignees]

    def query(**params) -> str:
        return "/api/tasks?" + urllib.parse.urlencode(params)

    def body(**fields) -> str:
        return json.dumps(fields)

    cursors = []
    for params in (
        {},
        {"status": "open"},
        {"sort_by": "task_time", "sort_order": "asc"},
        {"contact_person_id": assignees[0], "sort_by": "entity_name"},
        {"task_type": types[0].lower(), "per_page": 50},
    ):
        pagination = run.checked(server, "GET", query(**params), token)["pagination"]
        for _ in range(15):
            if not pagination.get("next_cursor"):
                break
            cursors.append(pagination["next_cursor"])
            pagination = run.checked(server, "GET", query(cursor=pagination["next_cursor"]), token)["pagination"]
    if not cursors:
        raise BenchError("No list page had a next_cursor: the cursor pages cannot be part of the mix.")

    def status() -> str:
        return rng.choice(("open", "closed"))

    def task_time() -> str:
        return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(7, 18):02d}:00:00Z"

    filters = [
        lambda: query(status=status()),
        lambda: query(contact_person_id=rng.choice(assignees)),
        lambda: query(task_type=rng.choice(types).lower()),
        lambda: query(entity_name=rng.choice(fragments)),
        lambda: query(date_from=dates[0], date_to=dates[1]),
        lambda: query(date_from=dates[2], date_to=dates[3], status=status()),
        lambda: query(status="open", contact_person_id=rng.choice(assignees), sort_by="task_time", sort_order="asc"),
        lambda: query(task_type=rng.choice(types).lower(), status=status(), per_page=50),
    ]
    updates = [
        lambda: body(note=f"Soak note {rng.randint(1, 999)}"),
        lambda: body(note=None),
        lambda: body(task_time=task_time()),
        lambda: body(contact_person_id=rng.choice(users)),
    ]
    make = {
        "list_default": lambda: ("GET", "/api/tasks", ""),
        "list_filter": lambda: ("GET", rng.choice(filters)(), ""),
        "list_sort": lambda: (
            "GET",
            query(sort_by=rng.choice(run.SORT_FIELDS), sort_order=rng.choice(("asc", "desc"))),
            "",
        ),
        "list_page": lambda: ("GET", query(page=rng.randint(2, 50), per_page=rng.choice((10, 20, 50, 100))), ""),
        "cursor_page": lambda: ("GET", query(cursor=rng.choice(cursors)), ""),
        "task_get": lambda: ("GET", f"/api/tasks/{rng.choice(pool)}", ""),
        "create": lambda: (
            "POST",
            "/api/tasks",
            body(
                entity_name=f"{CREATE_MARK} {rng.randint(1, 50)}",
                task_type=rng.choice(types),
                task_time=task_time(),
                contact_person_id=rng.choice(users),
                note=rng.choice(("", "Created by the soak test.")),
            ),
        ),
        "delete_own": lambda: ("DELETE", "/api/tasks/<own>", ""),
        "update": lambda: ("PUT", f"/api/tasks/{rng.choice(pool)}", rng.choice(updates)()),
        "status_patch": lambda: ("PATCH", f"/api/tasks/{rng.choice(pool)}/status", body(status=status())),
        "bulk_status": lambda: (
            "PATCH",
            "/api/tasks/bulk-status",
            body(task_ids=rng.sample(pool, rng.choice((10, 50, 200))), status=status()),
        ),
        "dashboard": lambda: ("GET", "/api/analytics/dashboard", ""),
        "health": lambda: ("GET", "/api/health", ""),
        "me": lambda: ("GET", "/api/auth/me", ""),
        "users": lambda: ("GET", "/api/users", ""),
    }
    assert sum(weight for weight, _ in MIX.values()) == 100
    lines = [(name, *make[name]()) for name, (weight, _) in MIX.items() for _ in range(weight * MIX_LINES // 100)]
    rng.shuffle(lines)
    return lines, {"admin_id": admin_id, "users": users, "cursors": len(cursors), "pool": len(pool)}


def check_mix(server: run.Server, lines: list, token: str) -> None:
    """Every distinct read of the mix, and one request of each write kind, answers 2xx before the soak."""
    reads = sorted({path for _name, method, path, _body in lines if method == "GET"})
    log(f"Checking the mix: {len(reads)} distinct reads and one request of each write kind")
    for path in reads:
        run.checked(server, "GET", path, token)
    seen = set()
    for name, method, path, body in lines:
        if method == "GET" or name in seen or name == "delete_own":
            continue
        seen.add(name)
        answer = run.checked(server, method, path, token, json.loads(body) if body else None)
        if name == "create":  # and delete it again: the path delete_own takes
            run.checked(server, "DELETE", f"/api/tasks/{answer['task']['id']}", token)


# -- memory, from /proc ---------------------------------------------------------------------------------------


def children(master: int) -> list[int]:
    """The gunicorn master's child processes (its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        if int(fields[1]) == master:
            pids.append(int(entry.name))
    return sorted(pids)


def memory(pid: int) -> dict | None:
    """RSS, PSS and USS (private clean + dirty) in MiB, and CPU seconds so far; None once the process is gone."""
    try:
        rollup = (Path("/proc") / str(pid) / "smaps_rollup").read_text()
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    kib = {}
    for line in rollup.splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            kib[key.strip()] = int(parts[0])
    fields = stat[stat.rfind(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {
        "rss": kib.get("Rss", 0) / 1024,
        "pss": kib.get("Pss", 0) / 1024,
        "uss": (kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)) / 1024,
        "swap": kib.get("Swap", 0) / 1024,
        "cpu_s": (int(fields[11]) + int(fields[12])) / ticks,  # utime + stime
    }


def sample(master: int, started: float) -> dict:
    workers = {}
    for pid in children(master):
        reading = memory(pid)
        if reading:
            workers[str(pid)] = reading
    return {
        "t": time.monotonic() - started,
        "load": os.getloadavg()[0],
        "master": memory(master),
        "workers": workers,
    }


# -- load -----------------------------------------------------------------------------------------------------


def wrk_interval(server: run.Server, args, token: str, mix_path: Path, users: list[str], seconds: int, start: int):
    """One wrk run of the mix for ``seconds``; its SOAK_RESULT (see bench/soak.lua)."""
    pending = OUT / "pending.txt"
    environment = os.environ | {
        "SOAK_MIX": str(mix_path),
        "SOAK_TOKEN": token,
        "SOAK_START": str(start),
        "SOAK_USERS": ",".join(users),
        "SOAK_PENDING": str(pending),
    }
    command = ["wrk", f"-t{args.threads}", f"-c{args.clients}", f"-d{seconds}s", "--timeout", "10s", "-s", str(LUA)]
    finished = subprocess.run(
        [*command, server.url], env=environment, capture_output=True, text=True, timeout=seconds + 60
    )
    line = next((line for line in finished.stdout.splitlines() if line.startswith("SOAK_RESULT ")), None)
    if finished.returncode or line is None:
        raise BenchError(f"wrk failed ({finished.returncode}): {finished.stderr or finished.stdout}")
    result = json.loads(line.removeprefix("SOAK_RESULT "))
    pending.write_text("".join(f"{task_id}\n" for task_id in result.pop("pending")))
    return result


def soak(args, server: run.Server, token: str, mix_path: Path, users: list[str]) -> list[dict]:
    """Samples at the start and after each interval: memory per worker, load, and the interval's wrk result;
    and, every --scrape-every seconds, a scrape of /metrics as Prometheus makes (when the app serves it)."""
    master = server.process.pid
    (OUT / "pending.txt").write_text("")
    metrics_token = server.app.env.get("METRICS_TOKEN", "")
    status, size = scrape(server, metrics_token)
    scraping = args.scrape_every > 0 and status != 404
    if not scraping:
        log("No /metrics scrapes: " + ("--scrape-every 0" if args.scrape_every <= 0 else "the app serves no /metrics"))
    started = time.monotonic()
    samples = [sample(master, started) | ({"scrape": [status, size]} if scraping else {})]
    next_scrape = args.scrape_every
    log(
        f"Soak: {args.seconds} s of mixed traffic, {args.clients} clients, a sample every {args.interval} s; "
        f"workers {', '.join(samples[0]['workers'])}"
    )
    elapsed, index = 0, 0
    while elapsed < args.seconds:
        seconds = min(args.interval, args.seconds - elapsed)
        result = wrk_interval(server, args, token, mix_path, users, seconds, index * 389)
        elapsed += seconds
        index += 1
        point = sample(master, started) | {"wrk": result, "load_s": elapsed}
        if scraping and elapsed >= next_scrape:
            point["scrape"] = list(scrape(server, metrics_token))
            next_scrape += args.scrape_every
        samples.append(point)
        errors = result["non2xx"] + socket_errors(result) + (point.get("scrape", [200])[0] != 200)
        rss = "  ".join(f"{pid}: {reading['rss']:.1f}" for pid, reading in point["workers"].items())
        log(
            f"  {elapsed:4d} s  {result['requests'] / (result['duration_us'] / 1e6):6.1f} req/s  "
            f"p50 {result['p50_us'] / 1000:6.2f}  p99 {result['p99_us'] / 1000:7.2f} ms  errors {errors}  "
            f"RSS MiB {rss}  load {point['load']:.2f}"
        )
        if server.process.poll() is not None:
            raise BenchError(f"gunicorn exited during the soak ({server.process.returncode}):\n{server.log_tail()}")
    return samples


def scrape(server: run.Server, token: str) -> tuple[int, int]:
    """(status, bytes) of one GET /metrics, as Prometheus scrapes it; (0, 0) when the connection fails."""
    request = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, len(response.read())
    except urllib.error.HTTPError as error:
        return error.code, len(error.read())
    except OSError:
        return 0, 0


def socket_errors(result: dict) -> int:
    return sum(result[key] for key in ("connect_errors", "read_errors", "write_errors", "timeouts"))


# -- judging --------------------------------------------------------------------------------------------------


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) points, in MiB per minute."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if not spread:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 60


def judge_workers(args, samples: list[dict]) -> list[dict]:
    """One row per worker pid seen: its memory at start, after its warm-up, at the end, and the verdict."""
    lives: dict[str, list[tuple[float, dict]]] = {}
    for point in samples:
        for pid, reading in point["workers"].items():
            lives.setdefault(pid, []).append((point["t"], reading))
    first_pids = set(samples[0]["workers"])
    last_pids = set(samples[-1]["workers"])
    rows = []
    for pid, life in lives.items():
        born, died = life[0][0], life[-1][0]
        warm_end = born + args.warmup_share * (died - born)
        after = [(t, reading) for t, reading in life if t >= warm_end]
        row = {
            "pid": pid,
            "from_start": pid in first_pids,
            "to_end": pid in last_pids,
            "first_t": born,
            "last_t": died,
            "samples": len(life),
            "rss_start": life[0][1]["rss"],
            "rss_warm": after[0][1]["rss"],
            "rss_end": life[-1][1]["rss"],
            "rss_max": max(reading["rss"] for _, reading in life),
            "uss_start": life[0][1]["uss"],
            "uss_warm": after[0][1]["uss"],
            "uss_end": life[-1][1]["uss"],
            "pss_end": life[-1][1]["pss"],
            "cpu_s": life[-1][1]["cpu_s"] - life[0][1]["cpu_s"],
        }
        row["growth"] = row["rss_end"] - row["rss_warm"]
        row["uss_growth"] = row["uss_end"] - row["uss_warm"]
        span = after[-1][0] - after[0][0]
        row["span_s"] = span
        row["slope"] = slope_per_minute([(t, reading["rss"]) for t, reading in after]) if len(after) > 1 else 0.0
        row["slope_judged"] = span >= SLOPE_MIN_SPAN_S
        problems = []
        if len(after) < MIN_JUDGED_SAMPLES:
            row["verdict"] = f"not judged: {len(after)} samples after its warm-up"
            row["ok"] = None
            rows.append(row)
            continue
        if row["growth"] >= args.max_growth:
            problems.append(f"grew {row['growth']:.1f} MiB (limit {args.max_growth:g})")
        if row["slope_judged"] and row["slope"] >= args.max_slope:
            problems.append(f"slope {row['slope']:.2f} MiB/min (limit {args.max_slope:g})")
        row["ok"] = not problems
        row["verdict"] = "flat" if not problems else "**growing**: " + ", ".join(problems)
        if not row["slope_judged"]:
            row["verdict"] += f" (slope not judged: {span:.0f} s < {SLOPE_MIN_SPAN_S} s)"
        rows.append(row)
    return rows


def weighted_percentile(pairs: list[tuple[float, float]], share: float) -> float:
    pairs = sorted(pairs)
    total = sum(weight for _, weight in pairs)
    running = 0.0
    for value, weight in pairs:
        running += weight
        if running >= share * total:
            return value
    return pairs[-1][0] if pairs else 0.0


def summarise(args, samples: list[dict], workers: list[dict]) -> dict:
    intervals = [point["wrk"] for point in samples[1:]]
    requests = sum(result["requests"] for result in intervals)
    load_seconds = sum(result["duration_us"] for result in intervals) / 1e6
    statuses: dict[str, int] = {}
    sent: dict[str, int] = {}
    for result in intervals:
        for code, count in result["statuses"].items():
            statuses[code] = statuses.get(code, 0) + count
        for name, count in result["sent"].items():
            sent[name] = sent.get(name, 0) + count
    quantiles = [
        (value / 1000, result["requests"] / len(result["quantiles_us"]))
        for result in intervals
        for value in result["quantiles_us"]
    ]
    non2xx = sum(result["non2xx"] for result in intervals)
    sockets = sum(socket_errors(result) for result in intervals)
    status_errors = sum(result["status_errors"] for result in intervals)
    samples_bad = "".join(result["bad_samples"] for result in intervals)[:1500]
    scrapes = [point["scrape"] for point in samples if "scrape" in point]
    scrape_failures = sum(1 for status, _ in scrapes if status != 200)
    recycles = len(workers) - len(samples[0]["workers"])
    judged = [row for row in workers if row["ok"] is not None]
    memory_ok = bool(judged) and all(row["ok"] for row in judged)
    errors_ok = not (non2xx or sockets or status_errors or scrape_failures)
    workers_ok = args.recycle or recycles == 0
    return {
        "requests": requests,
        "load_seconds": load_seconds,
        "rps": requests / load_seconds if load_seconds else 0.0,
        "p50": weighted_percentile(quantiles, 0.50),
        "p95": weighted_percentile(quantiles, 0.95),
        "p99": weighted_percentile(quantiles, 0.99),
        "max": max(result["max_us"] for result in intervals) / 1000,
        "non2xx": non2xx,
        "socket_errors": sockets,
        "status_errors": status_errors,
        "bad_samples": samples_bad,
        "statuses": dict(sorted(statuses.items())),
        "sent": sent,
        "fallbacks": sum(result["fallbacks"] for result in intervals),
        "scrapes": len(scrapes),
        "scrape_failures": scrape_failures,
        "scrape_bytes": [scrapes[0][1], scrapes[-1][1]] if scrapes else None,
        "recycles": recycles,
        "load_max": max(point["load"] for point in samples),
        "errors_ok": errors_ok,
        "memory_ok": memory_ok,
        "workers_ok": workers_ok,
        "ok": errors_ok and memory_ok and workers_ok,
    }


# -- reports --------------------------------------------------------------------------------------------------


def mib(value: float) -> str:
    return f"{value:.1f}"


def signed_mib(value: float) -> str:
    return f"{value:+.1f}"


def rule_text(args) -> str:
    return (
        f"after a warm-up of the first {args.warmup_share:.0%} of each worker's life, its RSS grows by less than "
        f"{args.max_growth:g} MiB to the end and its least-squares slope stays below {args.max_slope:g} MiB/min "
        f"(the slope judged over {SLOPE_MIN_SPAN_S} s or more)"
    )


def recycling_text(meta: dict, summary: dict) -> str:
    settings = meta["gunicorn"]
    if meta["recycle"]:
        return (
            f"production's recycling kept (max_requests {settings.get('max_requests', '?')} + up to "
            f"{settings.get('max_requests_jitter', '?')}): {summary['recycles']} recycle(s), each pid judged on its "
            "own life"
        )
    return "worker recycling off for the run (`--max-requests 0`), so each worker's memory is followed over one life"


def summary_block(meta: dict, summary: dict, workers: list[dict], args) -> str:
    settings = meta["gunicorn"]
    verdict = "**PASSED**" if summary["ok"] else "**FAILED**"
    failed = [
        name
        for name, ok in (
            ("errors", summary["errors_ok"]),
            ("memory", summary["memory_ok"]),
            ("workers", summary["workers_ok"]),
        )
        if not ok
    ]
    lines = [
        report.SOAK_START,
        f"{verdict}{' (' + ', '.join(failed) + ')' if failed else ''}: {meta['seconds'] / 60:.1f} minutes of mixed "
        f"traffic from {meta['clients']} wrk clients against gunicorn as production starts it (gunicorn.conf.py: "
        f"{settings.get('workers', '?')} {settings.get('worker_class', '?')} workers, preloaded app; "
        f"{recycling_text(meta, summary)}) on {meta['tasks']:,} tasks in PostgreSQL "
        f"{meta['postgres']['server_version'].split()[0]}, rate limits counted in Redis. {meta['date']}, commit "
        f"{meta['commit']}; {meta['cpus']} cores shared with PostgreSQL, Redis and wrk, load average "
        f"{meta['load_before']:.2f} before and up to {summary['load_max']:.2f} during"
        + (" (**other work was running: the numbers are noisier**)." if meta["load_before"] > 0.5 else "."),
        "",
        "| Soak | |",
        "|---|---|",
        f"| Duration, clients | {meta['seconds']} s of load, {meta['clients']} clients, a sample every "
        f"{meta['interval']} s |",
        f"| Requests | {summary['requests']:,}, {summary['rps']:,.0f} req/s |",
        f"| Errors | {summary['non2xx']} answers outside 2xx, {summary['socket_errors']} socket errors or timeouts"
        + (
            f", {summary['scrape_failures']} of {summary['scrapes']} /metrics scrapes failed"
            if summary["scrapes"]
            else ""
        )
        + f": {'ok' if summary['errors_ok'] else '**failed**'} |",
        f"| Latency | p50 {report.ms(summary['p50'])} ms, p95 {report.ms(summary['p95'])} ms, p99 "
        f"{report.ms(summary['p99'])} ms, max {report.ms(summary['max'])} ms |",
        f"| Memory rule | {rule_text(args)}: {'ok' if summary['memory_ok'] else '**failed**'} |",
        f"| Workers | {len(workers)} pid(s) seen, {summary['recycles']} replaced: "
        f"{'ok' if summary['workers_ok'] else '**failed** (a worker crashed or timed out: see the gunicorn log)'} |",
        "",
        "| Worker pid | RSS MiB at start | after warm-up | end | max | growth | slope MiB/min | USS MiB start → end "
        "| PSS MiB end | CPU s | Verdict |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in workers:
        life = "" if row["from_start"] and row["to_end"] else f" ({row['first_t']:.0f}-{row['last_t']:.0f} s)"
        lines.append(
            f"| {row['pid']}{life} | {mib(row['rss_start'])} | {mib(row['rss_warm'])} | {mib(row['rss_end'])} "
            f"| {mib(row['rss_max'])} | {signed_mib(row['growth'])} | {row['slope']:+.2f} "
            f"| {mib(row['uss_start'])} → {mib(row['uss_end'])} | {mib(row['pss_end'])} | {row['cpu_s']:.0f} "
            f"| {row['verdict']} |"
        )
    lines += [
        "",
        "Details (the request mix, memory every few seconds) in [bench/soak.md](soak.md), chart "
        "[bench/soak.png](soak.png).",
        report.SOAK_END,
    ]
    return "\n".join(lines)


def soak_markdown(meta: dict, summary: dict, workers: list[dict], samples: list[dict], args) -> str:
    block = summary_block(meta, summary, workers, args)
    alive = max(len(samples[-1]["workers"]), 1)
    per_worker = summary["rps"] * 60 / alive  # requests a minute per worker
    judged_s = (1 - args.warmup_share) * meta["seconds"]
    leak_bytes = args.max_slope * MIB / per_worker if per_worker else 0.0
    growth_bytes = args.max_growth * MIB / (per_worker * judged_s / 60) if per_worker and judged_s else 0.0
    per_life = leak_bytes * 22_000 / MIB
    lines = [
        "# Soak test (`make soak`)",
        "",
        f"Written by `make soak` (bench/soak.py) on {meta['date']} at commit {meta['commit']}; every run rewrites "
        "this file. The part between the soak markers is copied into bench/results.md (and kept there when "
        "`make bench` rewrites that file).",
        "",
        block,
        "",
        "![RSS and USS per gunicorn worker over the soak, with req/s and errors](soak.png)",
        "",
        "## Setup",
        "",
        f"- Machine: {meta['cpus']} cores ({meta['cpu_model']}), {meta['memory']} of memory; gunicorn, "
        f"PostgreSQL, Redis and wrk on it, over loopback. {meta['wrk']}, Python {meta['python']}.",
        f"- Database `{meta['database']}` (dropped afterwards): `flask db upgrade`, `flask seed-demo` "
        f"({meta['tasks']:,} tasks over {meta['users']} demo users), `VACUUM ANALYZE`.",
        "- The app as in production: `APP_ENV=production`, rate limits on and counted in Redis, raised far above "
        "the load, under a key prefix of the run's own (removed afterwards); "
        f"`LOG_LEVEL={meta['log_level']}` (production's default logs a line per request, to "
        "bench/out/soak/gunicorn-soak.log here). Requests as demo0001 (an administrator).",
        (
            f"- Prometheus: `/metrics` scraped every {meta['scrape_every']} s with the run's METRICS_TOKEN, "
            f"{summary['scrapes']} scrapes, the answer {summary['scrape_bytes'][0]:,} bytes at the start and "
            f"{summary['scrape_bytes'][1]:,} at the end (a growing answer would mean growing label sets)."
            if summary["scrapes"]
            else "- Prometheus: no `/metrics` scrapes (the app serves none, or --scrape-every 0)."
        ),
        f"- gunicorn: `gunicorn -c gunicorn.conf.py --bind 127.0.0.1:PORT {' '.join(meta['overrides'])} app:app`; "
        f"resolved settings: " + ", ".join(f"{key} {value}" for key, value in meta["gunicorn"].items()) + ".",
        f"- Load: wrk ({meta['threads']} thread(s), {meta['clients']} connections, 10 s timeout) running "
        f"bench/soak.lua over a shuffled mix of {MIX_LINES:,} requests, as back-to-back runs of {meta['interval']} s; "
        f"after each, the memory of every child of the gunicorn master from /proc/PID/smaps_rollup (RSS; PSS, "
        "shared pages split between the processes sharing them; USS, the pages only it holds, which grows as a "
        "preloaded worker writes to pages it shared with the master). Latency percentiles merge the intervals' "
        "1,000 quantiles each, weighted by their request counts.",
        f"- Whole run {meta['total_s'] / 60:.1f} minutes, seeding included ({meta['seed_s']:.0f} s).",
        "",
        "## What passes",
        "",
        "- **No errors**: every answer 2xx (wrk's count of non-2xx/3xx answers and bench/soak.lua's own count "
        "outside 2xx), and no socket error or timeout.",
        f"- **Flat memory**: {rule_text(args)}. The warm-up leaves out what a fresh worker does once: importing "
        "lazily, filling caches, SQLAlchemy's compiled statements, the connection pool. A leak grows with the "
        f"requests served: each worker served about {per_worker:,.0f} requests a minute in this run, so "
        f"{args.max_slope:g} MiB/min is about {leak_bytes:,.0f} bytes kept for good per request, and "
        f"{args.max_growth:g} MiB over the {judged_s:.0f} s judged about {growth_bytes:,.0f} bytes per request. "
        f"A leak at the slope limit would add about {per_life:.1f} MiB to a worker over one production life "
        "(gunicorn.conf.py recycles after 20,000 + up to 2,000 requests, which gives it back); anything faster "
        "fails the soak. On a busy machine the workers serve fewer requests a minute, so the same limits catch only "
        "faster leaks: compare the figures of a quiet run. RSS is judged because it is what a worker holds; USS is "
        "shown beside it: it grows as copy-on-write moves pages a worker shared with the preloaded master into its "
        "own, which adds nothing to RSS.",
        f"- **Workers stable**: {recycling_text(meta, summary)}; a pid that changes without recycling means a "
        "crash or a timeout kill.",
        "",
        "## The request mix",
        "",
        "| Kind | Weight % | Sent | Requests |",
        "|---|--:|--:|---|",
    ]
    for name, (weight, shown) in MIX.items():
        lines.append(f"| `{name}` | {weight} | {summary['sent'].get(name, 0):,} | {shown} |")
    if summary["fallbacks"]:
        lines.append(
            f"| `delete_fallback` | | {summary['fallbacks']:,} | GET /api/health sent when a `delete_own` came "
            "before any create it could delete |"
        )
    codes = ", ".join(f"{code}: {count:,}" for code, count in summary["statuses"].items())
    lines += [
        "",
        f"Status codes: {codes}. Cursor pages from {meta['mix']['cursors']} cursors; single-task reads and writes "
        f"over {meta['mix']['pool']:,} seeded tasks.",
    ]
    if summary["bad_samples"]:
        lines += ["", "First answers outside 2xx:", "", "```", summary["bad_samples"].strip(), "```"]
    pids = [row["pid"] for row in workers]
    lines += [
        "",
        "## Over time",
        "",
        "| s | req/s | errors | p50 ms | p99 ms | "
        + " | ".join(f"RSS {pid}" for pid in pids)
        + " | "
        + " | ".join(f"USS {pid}" for pid in pids)
        + " | load |",
        "|--:|--:|--:|--:|--:|" + "--:|" * (2 * len(pids)) + "--:|",
    ]
    for point in samples:
        result = point.get("wrk")
        if result:
            rate = result["requests"] / (result["duration_us"] / 1e6)
            errors = result["non2xx"] + socket_errors(result)
            head = (
                f"| {point['load_s']} | {rate:,.0f} | {errors} | {report.ms(result['p50_us'] / 1000)} "
                f"| {report.ms(result['p99_us'] / 1000)} |"
            )
        else:
            head = "| 0 (before) | | | | |"
        rss = " | ".join(mib(point["workers"][pid]["rss"]) if pid in point["workers"] else "" for pid in pids)
        uss = " | ".join(mib(point["workers"][pid]["uss"]) if pid in point["workers"] else "" for pid in pids)
        lines.append(f"{head} {rss} | {uss} | {point['load']:.2f} |")
    master = samples[-1]["master"]
    if master:
        lines += [
            "",
            f"The master (which serves nothing) held {mib(master['rss'])} MiB RSS, {mib(master['uss'])} MiB USS at "
            "the end.",
        ]
    return "\n".join(lines) + "\n"


def chart(meta: dict, samples: list[dict], workers: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 9), sharex=True, height_ratios=(3, 2, 2))
    warm = args.warmup_share * samples[-1]["t"] / 60
    for index, row in enumerate(workers):
        color = f"C{index % 10}"
        points = [(p["t"] / 60, p["workers"][row["pid"]]) for p in samples if row["pid"] in p["workers"]]
        times = [t for t, _ in points]
        top.plot(times, [r["rss"] for _, r in points], color=color, label=f"RSS, worker {row['pid']}")
        top.plot(times, [r["uss"] for _, r in points], color=color, linestyle="--", label=f"USS, worker {row['pid']}")
        middle.plot(
            times,
            [r["rss"] - row["rss_warm"] for _, r in points],
            color=color,
            marker=".",
            label=f"worker {row['pid']}",
        )
    for axes in (top, middle):
        axes.axvspan(0, warm, color="grey", alpha=0.12, label="warm-up (not judged)")
        axes.grid(alpha=0.3)
    top.set_ylabel("MiB")
    top.set_ylim(bottom=0)
    top.legend(fontsize="small", ncol=2, loc="lower right")
    middle.axhline(args.max_growth, color="red", linestyle=":", label=f"growth limit (+{args.max_growth:g} MiB)")
    middle.set_ylabel("RSS MiB since warm-up")
    low, high = middle.get_ylim()
    middle.set_ylim(min(-1.0, low), max(args.max_growth + 1, high))
    middle.legend(fontsize="small", ncol=2, loc="upper left")
    commit = meta["commit"].replace(" with uncommitted changes", "+")
    top.set_title(
        f"make soak: memory per gunicorn worker, {meta['clients']} clients of mixed traffic, {meta['tasks']:,} tasks"
        f"\n{meta['date']}, commit {commit}"
    )
    times = [p["t"] / 60 for p in samples[1:]]
    rates = [p["wrk"]["requests"] / (p["wrk"]["duration_us"] / 1e6) for p in samples[1:]]
    errors = [p["wrk"]["non2xx"] + socket_errors(p["wrk"]) for p in samples[1:]]
    bottom.plot(times, rates, color="C0", marker=".", label="req/s (interval)")
    bad = [(t, r) for t, r, e in zip(times, rates, errors, strict=True) if e]
    if bad:
        bottom.scatter([t for t, _ in bad], [r for _, r in bad], color="red", zorder=3, label="interval with errors")
    bottom.set_ylabel("req/s")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("minutes")
    bottom.grid(alpha=0.3)
    load = bottom.twinx()
    load.plot([p["t"] / 60 for p in samples], [p["load"] for p in samples], color="grey", linestyle=":")
    load.set_ylabel("load average (1 min, dotted)")
    load.set_ylim(bottom=0)
    bottom.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- the run --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Soak the API: mixed traffic against gunicorn for a bounded time; memory and errors judged.",
        epilog="Needs wrk (apt-get install wrk; `make soak` installs it), PostgreSQL and Redis.",
    )
    parser.add_argument("--seconds", type=int, default=180, help="seconds of load (default 180)")
    parser.add_argument("--interval", type=int, default=5, help="seconds between memory samples (default 5)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent wrk connections (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks to seed (default 100,000)")
    parser.add_argument("--users", type=int, default=50, help="demo users the tasks are spread over (default 50)")
    parser.add_argument("--warmup-share", type=float, default=0.2, help="share of a worker's life not judged (0.2)")
    parser.add_argument("--max-growth", type=float, default=4.0, help="RSS growth after the warm-up, MiB (4)")
    parser.add_argument("--max-slope", type=float, default=1.0, help="RSS slope after the warm-up, MiB/min (1)")
    parser.add_argument("--recycle", action="store_true", help="keep gunicorn.conf.py's max_requests recycling")
    parser.add_argument("--log-level", default="INFO", help="the app's LOG_LEVEL (default INFO, as in production)")
    parser.add_argument("--scrape-every", type=int, default=15, help="seconds between /metrics scrapes (15; 0: none)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the request mix (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20,000 tasks, 30 s; writes bench/out/soak/")
    parser.add_argument(
        "--database", default=DATABASE_PREFIX, help=f"database name (must start with {DATABASE_PREFIX})"
    )
    parser.add_argument(
        "--postgres", default=os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--port", type=int, help="port for gunicorn (default: a free one)")
    parser.add_argument("--keep-db", action="store_true", help="keep the database afterwards")
    args = parser.parse_args(argv)
    if args.quick:
        if args.seconds == parser.get_default("seconds"):
            args.seconds = 30
        if args.tasks == parser.get_default("tasks"):
            args.tasks = 20_000
    if args.seconds < 1 or args.interval < 1 or args.clients < 1 or args.threads < 1:
        parser.error("--seconds, --interval, --clients and --threads must be at least 1")
    if args.threads > args.clients:
        parser.error("--threads cannot be more than --clients")
    if not 0 <= args.warmup_share < 1:
        parser.error("--warmup-share must be from 0 to below 1")
    return args


def write_reports(args, meta: dict, summary: dict, workers: list[dict], samples: list[dict]) -> None:
    folder = OUT if args.quick else BENCH
    (OUT / "soak.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "workers": workers, "samples": samples})
    )
    markdown = folder / "soak.md"
    markdown.write_text(soak_markdown(meta, summary, workers, samples, args))
    chart(meta, samples, workers, args, folder / "soak.png")
    written = [markdown, folder / "soak.png"]
    if not args.quick:
        report.update_soak_section(BENCH / "results.md", report.soak_block(markdown))
        written.append(BENCH / "results.md")
    log("Wrote " + ", ".join(str(path.relative_to(ROOT)) for path in written))


def main(argv=None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed: apt-get install wrk (make soak does it).")
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in ("setup.log", "seed.log", "gunicorn-soak.log"):
        (OUT / stale).unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below when stopped
    database = run.Database(args.postgres, args.database, prefix=DATABASE_PREFIX)
    app = run.App(args, database, name="soak", out=OUT)
    app.env["LOG_LEVEL"] = args.log_level.upper()
    overrides = [] if args.recycle else ["--max-requests", "0"]
    started = time.perf_counter()
    try:
        run.prepare(app, database)
        if not app.has_seed_demo():
            raise BenchError("This build has no `flask seed-demo` command, which the soak seeds with.")
        seeded_s = run.seed_to(app, database, args.tasks, args.users)
        load_before = run.busy_machine_warning()
        with run.Server(app, "soak", overrides) as server:
            token = run.login(server)
            lines, mix_info = build_mix(server, database, token, random.Random(args.seed))
            mix_path = OUT / "mix.tsv"
            mix_path.write_text("".join("\t".join(line) + "\n" for line in lines))
            check_mix(server, lines, token)
            samples = soak(args, server, token, mix_path, mix_info["users"])
        meta = run.machine_info(database, app, overrides, GUNICORN_KEYS) | {
            "seconds": args.seconds,
            "interval": args.interval,
            "clients": args.clients,
            "threads": args.threads,
            "tasks": args.tasks,
            "users": args.users,
            "database": database.name,
            "overrides": overrides,
            "recycle": args.recycle,
            "log_level": args.log_level.upper(),
            "scrape_every": args.scrape_every,
            "load_before": load_before,
            "seed_s": seeded_s,
            "mix": {key: value for key, value in mix_info.items() if key in ("cursors", "pool")},
            "total_s": time.perf_counter() - started,
        }
        workers = judge_workers(args, samples)
        summary = summarise(args, samples, workers)
        write_reports(args, meta, summary, workers, samples)
        print(report.soak_block(OUT / "soak.md" if args.quick else BENCH / "soak.md"))
        if not summary["ok"]:
            print("\n!!! The soak FAILED: see the verdicts above.", file=sys.stderr)
            return 1
        return 0
    finally:
        run.clean_up(args, database, app)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as error:
        print(f"soak: {error}", file=sys.stderr)
        sys.exit(2)
