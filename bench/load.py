"""The benchmark's load against any deployment of this API: the original app it replaces, a staging instance.

    .venv/bin/python bench/load.py http://10.0.0.5:8000 --username alice          # password: BENCH_PASSWORD, or asked
    .venv/bin/python bench/load.py http://10.0.0.5:8000 --token ACCESS_TOKEN --json bench/out/original.json
    .venv/bin/python bench/load.py URL --username alice --writes                  # also create and status changes

The same wrk runs as `make bench` (bench/scenario.lua: one request per scenario, one client, then 16 on the
endpoints the original app's figures cover; any answer outside 2xx fails the scenario), with the ids, filters and
cursor taken from the deployment's own answers, since its database is out of reach. It needs only the API's
contract: POST /api/auth/login ({username, password} -> access_token) unless --token is given, GET /api/health,
GET /api/tasks (tasks[].id, entity_name, contact_person.id; pagination.total, next_cursor), GET /api/tasks/<id>,
GET /api/analytics/dashboard; with --writes, GET /api/auth/me, POST /api/tasks, PATCH /api/tasks/<id>/status and
/api/tasks/bulk-status. A scenario the deployment does not answer with 2xx when it is tried once first is skipped,
and said so. Reads change nothing; --writes adds tasks (entity "Bench Create Co") and switches statuses back and
forth, then puts the statuses back as they were. It prints p50 and req/s per scenario, and --json writes them in
the form `bench/run.py --original` reads, to show them beside the API's in bench/results.md.

The network between this machine and the deployment is in every figure: to compare two deployments, measure both
from the same place, as close to them as `make bench` is to its gunicorn (the same machine).
"""

import argparse
import getpass
import json
import os
import re
import sys
import urllib.parse
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import report
import run
from run import BenchError, Scenario, log

CONCURRENT = ("list_default", "health", "task_get", "dashboard")  # the endpoints issue 14's original figures cover
BULK_IDS = 1000


def answer(target, method: str, path: str, token: str | None = None, body=None) -> tuple[int, object]:
    """(status, parsed JSON or None) of one request; an answer that is not JSON, or no answer, is status 0."""
    try:
        return run.http(target, method, path, token, body)
    except (OSError, ValueError) as error:
        return 0, str(error)


def sign_in(target, args) -> str:
    if args.token:
        return args.token
    if not args.username:
        raise BenchError("Give --username (and the password in BENCH_PASSWORD, or when asked) or --token.")
    password = args.password or os.environ.get("BENCH_PASSWORD") or getpass.getpass(f"Password for {args.username}: ")
    status, body = answer(target, "POST", "/api/auth/login", body={"username": args.username, "password": password})
    if status != 200 or not isinstance(body, dict) or "access_token" not in body:
        raise BenchError(f"Signing in at {target.url}/api/auth/login answered {status}: {str(body)[:300]}")
    return body["access_token"]


def query(**params) -> str:
    return "/api/tasks?" + urllib.parse.urlencode(params)


def fragment_near(target, token: str, names: list[str], total: int | None, share: float) -> tuple[str, str]:
    """Four letters found in about ``share`` of the tasks: the candidates found in about that share of the tasks at
    hand (a sample of the newest), then the one whose pagination.total is nearest; and how much it matches, as text."""
    found = Counter(
        fragment
        for name in names
        for fragment in {
            word[i : i + 4] for word in re.findall(r"[a-z]{4,}", name.lower()) for i in range(len(word) - 3)
        }
    )
    candidates = sorted(
        (fragment for fragment in found if fragment not in run.CREATE_MARK.lower()),
        key=lambda fragment: (abs(found[fragment] - share * len(names)), fragment),
    )[:8]
    if not candidates:
        raise BenchError("No entity name on the first pages has a word of four letters or more to search for.")
    if not total:
        return candidates[0], f"{found[candidates[0]] / len(names):.1%} of the {len(names):,} newest tasks"
    matches = {}
    for fragment in candidates:
        status, body = answer(target, "GET", query(entity_name=fragment, per_page=1), token)
        count = (body.get("pagination") or {}).get("total") if status == 200 and isinstance(body, dict) else None
        if isinstance(count, int):
            matches[fragment] = count
    if not matches:
        return candidates[0], f"{found[candidates[0]] / len(names):.1%} of the {len(names):,} newest tasks"
    fragment = min(matches, key=lambda fragment: (abs(matches[fragment] - share * total), fragment))
    return fragment, f"{matches[fragment]:,} tasks, {matches[fragment] / total:.1%}"


def build_scenarios(target, token: str, writes: bool) -> tuple[list[Scenario], list[tuple[str, str]], int | None]:
    """The scenarios from the deployment's own answers; with ``writes``, the (id, status) pairs to restore; and the
    number of tasks the deployment says it has."""
    status, first = answer(target, "GET", "/api/tasks", token)
    if status != 200 or not isinstance(first, dict) or not first.get("tasks"):
        raise BenchError(f"GET /api/tasks answered {status} or no tasks: {str(first)[:300]}")
    pagination = first.get("pagination") or {}
    tasks = {task["id"]: task for task in first["tasks"]}
    seen, page = first, 0
    while len(tasks) < BULK_IDS + 3 and page < 20:  # by cursor where there is one, else by page number
        cursor = (seen.get("pagination") or {}).get("next_cursor")
        page += 1
        path = query(cursor=cursor, per_page=100) if cursor else query(page=page, per_page=100)
        status, seen = answer(target, "GET", path, token)
        fresh = {task["id"]: task for task in seen.get("tasks") or []} if isinstance(seen, dict) else {}
        if status != 200 or not fresh.keys() - tasks.keys():
            break
        tasks |= fresh
    tasks = list(tasks.values())
    people = Counter((task.get("contact_person") or {}).get("id") for task in tasks)
    people.pop(None, None)
    fragment, matched = fragment_near(
        target, token, [task.get("entity_name") or "" for task in tasks], pagination.get("total"), run.PARTIAL_SHARE
    )
    single = tasks[0]["id"]
    scenarios = [
        Scenario("health", "GET /api/health (no token)", "GET", "/api/health", auth=False),
        Scenario("list_default", "GET /api/tasks (page 1)", "GET", "/api/tasks"),
        Scenario("list_status", "status=open", "GET", query(status="open")),
        Scenario(
            "list_assignee",
            "contact_person_id=<busiest assignee on the first pages>",
            "GET",
            query(contact_person_id=people.most_common(1)[0][0]) if people else "",
            skip=None if people else "no task on the first pages has an assignee",
        ),
        Scenario(
            "list_partial", f"entity_name={fragment} (partial match: {matched})", "GET", query(entity_name=fragment)
        ),
        Scenario(
            "cursor_page",
            "cursor=<next_cursor of page 1>",
            "GET",
            query(cursor=pagination["next_cursor"]) if pagination.get("next_cursor") else "",
            skip=None if pagination.get("next_cursor") else "page 1 has no pagination.next_cursor",
        ),
        Scenario("task_get", "GET /api/tasks/<id>", "GET", f"/api/tasks/{single}"),
        Scenario("dashboard", "GET /api/analytics/dashboard", "GET", "/api/analytics/dashboard"),
    ]
    restore: list[tuple[str, str]] = []
    total = pagination.get("total")
    if not writes:
        return scenarios, restore, total
    status, me = answer(target, "GET", "/api/auth/me", token)
    me_id = ((me or {}).get("user") or {}).get("id") if isinstance(me, dict) else None
    create = {"entity_name": run.CREATE_MARK, "task_type": "Call", "task_time": "2026-01-15T10:00:00Z", "note": ""}
    bulk = [task["id"] for task in tasks[1 : BULK_IDS + 1]]
    restore = [(task["id"], task.get("status", "open")) for task in tasks[: BULK_IDS + 1]]
    scenarios += [
        Scenario(
            "create",
            "POST /api/tasks",
            "POST",
            "/api/tasks",
            [json.dumps(create | {"contact_person_id": me_id})],
            skip=None if me_id else f"GET /api/auth/me answered {status} without user.id",
        ),
        Scenario(
            "status_patch",
            "PATCH /api/tasks/<id>/status (closed/open in turn)",
            "PATCH",
            f"/api/tasks/{single}/status",
            [json.dumps({"status": "closed"}), json.dumps({"status": "open"})],
        ),
        Scenario(
            "bulk_status",
            f"PATCH /api/tasks/bulk-status, {len(bulk):,} ids (closed/open in turn)",
            "PATCH",
            "/api/tasks/bulk-status",
            [json.dumps({"task_ids": bulk, "status": status}) for status in ("closed", "open")],
            skip=None if len(bulk) == BULK_IDS else f"only {len(bulk)} tasks found for the 1,000 ids",
        ),
    ]
    return scenarios, restore, total


def tried(target, scenarios: list[Scenario], token: str) -> None:
    """Each scenario once: one the deployment does not answer with 2xx is skipped (a write is tried by its load)."""
    for scenario in scenarios:
        if scenario.skip or scenario.bodies:
            continue
        status, body = answer(target, scenario.method, scenario.path, token if scenario.auth else None)
        if not 200 <= status < 300:
            scenario.skip = f"answered {status} when tried: {str(body)[:120]}"


def put_back(target, token: str, restore: list[tuple[str, str]]) -> None:
    """The statuses the write scenarios switched, as they were before (one bulk change per status)."""
    for status in ("open", "closed"):
        ids = [task_id for task_id, was in restore if was == status]
        if ids:
            answer(target, "PATCH", "/api/tasks/bulk-status", token, {"task_ids": ids, "status": status})


def span(values: list[float]) -> str:
    low, high = (f"{value:,g}" for value in values)
    return low if low == high else f"{low}-{high}"


def table(results: dict, clients: int) -> list[str]:
    original = report.ISSUE_ORIGINAL["figures"]
    lines = [
        f"| Scenario | Request | p50 ms | p95 ms | req/s, 1 client | req/s, {clients} clients "
        f"| {report.ISSUE_ORIGINAL['source']}: p50, req/s with 16 clients |",
        "|---|---|--:|--:|--:|--:|---|",
    ]
    for name, row in results["scenarios"].items():
        reference = original.get(name)
        reference = f"{span(reference['p50'])} ms, {span(reference['rps'])} req/s" if reference else ""
        if row.get("skip") or row.get("error"):
            lines.append(f"| `{name}` | {row['shown']} | {row.get('skip') or 'FAILED: ' + row['error']} | | | | |")
            continue
        many = "-" if row.get("rps_many") is None else f"{row['rps_many']:,.0f}"
        lines.append(
            f"| `{name}` | {row['shown']} | {report.ms(row['p50'])} | {report.ms(row['p95'])} | {row['rps']:,.0f} "
            f"| {many} | {reference} |"
        )
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Needs wrk (apt-get install wrk).")
    parser.add_argument("url", help="the deployment's base URL, e.g. https://tasks.example.com")
    parser.add_argument("--username", help="an account to sign in as (an administrator, for --writes)")
    parser.add_argument("--password", help="its password (better: BENCH_PASSWORD, or typed when asked)")
    parser.add_argument("--token", help="an access token to send instead of signing in")
    parser.add_argument("--writes", action="store_true", help="also create, status change and bulk status")
    parser.add_argument("--duration", type=int, default=5, help="seconds per scenario (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of untimed load first (default 1)")
    parser.add_argument("--clients", type=int, default=16, help="clients of the concurrent runs (default 16)")
    parser.add_argument("--concurrency-duration", type=int, default=10, help="seconds of each concurrent run")
    parser.add_argument("--quick", action="store_true", help="1 s per scenario, 2 s concurrent: a smoke run")
    parser.add_argument("--json", type=Path, help="write the figures here (for bench/run.py --original)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.concurrency_duration = 1, 1, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    target = SimpleNamespace(url=args.url.rstrip("/"))
    run.OUT.mkdir(exist_ok=True)  # wrk's request bodies go there
    token = sign_in(target, args)
    scenarios, restore, tasks = build_scenarios(target, token, args.writes)
    tried(target, scenarios, token)
    log(f"Load on {target.url}: {args.duration} s per scenario after {args.warmup} s of warm-up, 1 client")
    results = {"url": target.url, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "tasks": tasks}
    results["scenarios"] = {}
    try:
        for scenario in scenarios:
            row = {"shown": scenario.shown, "skip": scenario.skip}
            results["scenarios"][scenario.name] = row
            if scenario.skip:
                log(f"  {scenario.name:<15} skipped: {scenario.skip}")
                continue
            row |= run.measure(target, scenario, token, 1, args.duration, args.warmup)
        for name in CONCURRENT:
            row = results["scenarios"][name]
            if not row["skip"]:
                scenario = next(scenario for scenario in scenarios if scenario.name == name)
                crowd = run.measure(target, scenario, token, args.clients, args.concurrency_duration, args.warmup)
                row["rps_many"], row["p50_many"] = crowd["rps"], crowd["p50"]
                row["error"] = row["error"] or crowd["error"]
    finally:
        put_back(target, token, restore)
    print("\n" + "\n".join(table(results, args.clients)) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        log(f"Wrote {args.json} (bench/run.py --original {args.json} shows it beside the API's figures)")
    failed = [name for name, row in results["scenarios"].items() if row.get("error")]
    if failed:
        print(f"!!! FAILED scenarios (answers outside 2xx): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as error:
        print(f"bench/load.py: {error}", file=sys.stderr)
        sys.exit(2)
