"""The benchmark's reports: bench/results.md, its chart, the table in docs/performance.md and bench/workers.md.

bench/results.md also carries the summary of the latest `make soak` (bench/soak.py): the part of bench/soak.md
between its soak markers, copied in whenever either program writes the file.
"""

import json
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parent
NOTES = BENCH / "notes.md"
TABLE_START, TABLE_END = "<!-- bench:start -->", "<!-- bench:end -->"
SOAK = BENCH / "soak.md"
SOAK_START, SOAK_END = "<!-- soak:start -->", "<!-- soak:end -->"
SOAK_HEADING = "## Soak test (`make soak`)"
# The original Flask app this API replaces, as issue 14 recorded it beside the API at commit e8ef789 (1,000,000
# tasks, production settings, 2 sync workers, this kind of machine): p50 with one client and req/s with 16 clients,
# each the range over its runs. The reference to beat; bench/load.py measures it afresh against a deployment.
ISSUE_ORIGINAL = {
    "source": "original (from issue 14, e8ef789's measurement)",
    "tasks": 1_000_000,
    "figures": {
        "health": {"p50": [0.8, 1.1], "rps": [2200, 2600]},
        "list_default": {"p50": [76, 94], "rps": [14, 14]},
        "task_get": {"p50": [7.6, 8.5], "rps": [370, 370]},
        "dashboard": {"p50": [630, 670], "rps": [1.2, 1.2]},
    },
}


def allowed_ms(sql_ms: float) -> float:
    """The issue's overhead rule: an endpoint answers within 1.5 times its own SQL time plus 3 ms."""
    return 1.5 * sql_ms + 3


def measured(row: dict) -> bool:
    return not row.get("skip") and "p50" in row and not row.get("error")


def rule_met(row: dict) -> bool | None:
    if not measured(row) or "sql_ms" not in row:
        return None
    return row["p50"] <= allowed_ms(row["sql_ms"])


def yardstick_ms(size: dict) -> float | None:
    """The minimal app's list p50 with one client in this size's run: what the targets are multiples of."""
    run = (size.get("minimal") or {}).get("c1")
    return None if not run or run["error"] else run["p50"]


def limit_ms(row: dict, size: dict) -> float | None:
    base = yardstick_ms(size)
    return None if row.get("target_ratio") is None or base is None else row["target_ratio"] * base


def total_exact(row: dict) -> bool | None:
    """Whether the answer's pagination.total was the exact count (for scenarios where it was checked)."""
    return None if "expect_total" not in row else row.get("total") == row["expect_total"]


def target_met(row: dict, size: dict) -> bool | None:
    if row.get("target_ratio") is None:
        return None
    limit = limit_ms(row, size)
    return measured(row) and limit is not None and row["p50"] <= limit and total_exact(row) is not False


def throughput_limit(results: dict, size: dict) -> float | None:
    """The default list's req/s target with --clients clients: a share of the minimal app's at the same count."""
    run = (size.get("minimal") or {}).get("cN")
    ratio = results["meta"].get("throughput_ratio", 0.5)
    return None if not run or run["error"] else ratio * run["rps"]


def throughput_met(results: dict, size: dict) -> bool:
    limit, run = throughput_limit(results, size), size["concurrent"]
    return limit is not None and not run["error"] and run["rps"] >= limit


def original_figures(path: Path | None) -> dict:
    """The original app's figures to compare with: measured by `bench/load.py --json PATH`, else issue 14's."""
    if path is None:
        return ISSUE_ORIGINAL
    run = json.loads(path.read_text())
    figures = {
        name: {"p50": [figures["p50"]] * 2, "rps": [figures["rps_many"]] * 2 if figures.get("rps_many") else None}
        for name, figures in run["scenarios"].items()
        if figures.get("p50") is not None and not figures.get("error")
    }
    source = f"original, measured by bench/load.py at {run['url']} on {run['date']}"
    return {"source": source, "tasks": run.get("tasks"), "figures": figures}


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def verdict(met: bool | None) -> str:
    return "" if met is None else "ok" if met else "**missed**"


def largest(results: dict) -> dict:
    return results["sizes"][-1]


def ratio_text(row: dict) -> str:
    return f"≤ {row['target_ratio']:g} x minimal list"


def missed_targets(results: dict) -> list[str]:
    """The issue's targets missed at the largest size (they are set for 1M tasks), the overhead rule counted."""
    size = largest(results)
    missed = []
    for row in size["scenarios"]:
        if target_met(row, size) is False:
            limit = limit_ms(row, size)
            text = f"{row['name']} p50 {ms(row.get('p50'))} ms (target {ratio_text(row)}: {ms(limit)} ms)"
            if total_exact(row) is False:
                text += f", total {row.get('total')} instead of {row['expect_total']:,}"
            missed.append(text)
    concurrent = size["concurrent"]
    if not throughput_met(results, size):
        limit = throughput_limit(results, size)
        missed.append(
            f"{concurrent['clients']} clients: {concurrent['rps']:.0f} req/s (target "
            f"≥ {results['meta'].get('throughput_ratio', 0.5):g} x minimal: {'-' if limit is None else f'{limit:.0f}'})"
        )
    over = [row["name"] for row in size["scenarios"] if rule_met(row) is False]
    if over:
        missed.append(f"{len(over)} endpoints above 1.5 x SQL + 3 ms ({', '.join(over)})")
    return missed


def clients(count: int) -> str:
    return f"{count} client" + ("s" if count != 1 else "")


def targets_table(results: dict) -> list[str]:
    """The issue's targets at the largest size, each as measured, as a multiple of the minimal app and its verdict
    (printed by `make bench` and written in bench/results.md under a heading that says the size)."""
    size, meta = largest(results), results["meta"]
    base, crowd = yardstick_ms(size), (size.get("minimal") or {}).get("cN")
    if base is None:
        yardstick = "the minimal app was not measured, so no target can be judged"
    else:
        yardstick = (
            f"the minimal app's list (bench/minimal_app.py, same run, same gunicorn settings): p50 **{ms(base)} ms** "
            f"with one client, **{crowd['rps']:,.0f} req/s** with {clients(crowd['clients'])}"
        )
    lines = [
        f"As multiples of {yardstick}.",
        "",
        "| Target | Measured | x minimal | Limit | Verdict |",
        "|---|--:|--:|--:|---|",
    ]
    for row in size["scenarios"]:
        if row.get("target_ratio") is None:
            continue
        target = f"`{row['name']}` p50 {ratio_text(row)}" + (", exact total" if "expect_total" in row else "")
        if row.get("skip") or row.get("error"):
            value = "not measured" if row.get("skip") else "FAILED"
            lines.append(f"| {target} | {value} | | | {verdict(False)} |")
            continue
        value = f"{ms(row['p50'])} ms"
        if "expect_total" in row:
            value += f", total {row.get('total')} of {row['expect_total']:,} " + (
                "(exact)" if total_exact(row) else "(**not exact**)"
            )
        times = "-" if base is None else f"{row['p50'] / base:.2f}"
        lines.append(
            f"| {target} | {value} | {times} | {ms(limit_ms(row, size))} ms | {verdict(target_met(row, size))} |"
        )
    run, limit = size["concurrent"], throughput_limit(results, size)
    ratio = meta.get("throughput_ratio", 0.5)
    times = "-" if limit is None else f"{run['rps'] / crowd['rps']:.2f}"
    lines.append(
        f"| default list, {run['clients']} clients ≥ {ratio:g} x minimal's req/s | {run['rps']:,.0f} req/s | {times} "
        f"| {'-' if limit is None else f'{limit:,.0f}'} req/s | {verdict(throughput_met(results, size))} |"
    )
    checked = [rule_met(row) for row in size["scenarios"] if rule_met(row) is not None]
    if checked:
        lines += [
            "",
            f"Overhead rule (every endpoint p50 ≤ 1.5 x its SQL time + 3 ms): {sum(checked)} of {len(checked)} "
            f"endpoints, {verdict(all(checked))}.",
        ]
    return lines


def original_section(results: dict) -> list[str]:
    """This run beside the original app's figures (issue 14's, or measured with bench/load.py)."""
    original = results.get("original") or ISSUE_ORIGINAL
    size = largest(results)
    rows = {row["name"]: row for row in size["scenarios"]}
    crowds = {"list_default": size["concurrent"], **size.get("concurrent_too", {})}
    clients = size["concurrent"]["clients"]
    tasks = original.get("tasks")
    lines = [
        "## Beside the original app",
        "",
        f"The Flask app this API replaces: {original['source']}, "
        + (f"at {tasks:,} tasks" if tasks else "on the data of that deployment")
        + (f" (this run: {size['size']:,})" if tasks != size["size"] else "")
        + ". Ahead: a lower p50 than the original's best and more requests per second than its best. The "
        "original is not on this machine: its figures are a reference, not a same-run measurement (bench/load.py "
        "measures any deployment with the same load; `bench/run.py --original` puts its figures here).",
        "",
        f"| Endpoint | original p50 ms | original req/s, {clients} clients | this run p50 ms "
        f"| this run req/s, {clients} clients | Verdict |",
        "|---|--:|--:|--:|--:|---|",
    ]

    def span(values, shown) -> str:
        if not values:
            return "-"
        low, high = (shown(value) for value in values)
        return low if low == high else f"{low}-{high}"

    for name, figures in original["figures"].items():
        row, crowd = rows.get(name, {}), crowds.get(name)
        ours_p50 = row.get("p50") if measured(row) else None
        ours_rps = crowd["rps"] if crowd and not crowd["error"] else None
        if ours_p50 is None:
            met = "not measured"
        else:
            faster = ours_p50 < figures["p50"][0]
            more = ours_rps is None or not figures.get("rps") or ours_rps > figures["rps"][1]
            met = "ahead" if faster and more else "**not ahead**"
        lines.append(
            f"| `{name}` | {span(figures['p50'], ms)} | {span(figures.get('rps'), rate)} | {ms(ours_p50)} "
            f"| {span([ours_rps] * 2 if ours_rps else None, rate)} | {met} |"
        )
    return lines


def shorten(statement: str, length: int = 150) -> str:
    statement = re.sub(r"\s+", " ", statement)
    statement = re.sub(r"SELECT .{40,}? FROM", "SELECT … FROM", statement, count=1)
    return statement if len(statement) <= length else statement[: length - 1] + "…"


def target_text(row: dict, size: dict) -> str:
    met = target_met(row, size)
    if met is None:
        return ""
    limit = limit_ms(row, size)
    return f"{ratio_text(row)} ({ms(limit)}): {verdict(met)}" if limit is not None else f"{ratio_text(row)}: -"


def scenario_table(size: dict) -> list[str]:
    base = yardstick_ms(size)
    lines = [
        "| Scenario | Request | req/s | p50 ms | p95 ms | p99 ms | x minimal | in-process ms | SQL ms | stmts "
        "| p50 / SQL | ≤ 1.5 x SQL + 3 | Target p50 |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for row in size["scenarios"]:
        name = f"`{row['name']}`"
        if row.get("skip"):
            target = f"{ratio_text(row)}: **not measured**" if row.get("target_ratio") else ""
            lines.append(f"| {name} | {row['shown']} | skipped: {row['skip']} | | | | | | | | | | {target} |")
            continue
        if row.get("error"):
            lines.append(f"| {name} | {row['shown']} | **FAILED: {row['error']}** | | | | | | | | | | |")
            continue
        sql = row.get("sql_ms")
        ratio = f"{row['p50'] / sql:.1f}" if sql else "-"
        rule = rule_met(row)
        rule_text = "" if rule is None else f"{verdict(rule)} ({ms(allowed_ms(sql))})"
        times = "-" if base is None else f"{row['p50'] / base:.1f}"
        lines.append(
            f"| {name} | {row['shown']} | {row['rps']:,.0f} | {ms(row['p50'])} | {ms(row['p95'])} | {ms(row['p99'])} "
            f"| {times} | {ms(row.get('app_ms'))} | {ms(sql)} | {row.get('statements', '-')} | {ratio} | {rule_text} "
            f"| {target_text(row, size)} |"
        )
    return lines


def run_figures(run: dict) -> str:
    return f"p50 {ms(run['p50'])} ms, p95 {ms(run['p95'])} ms, p99 {ms(run['p99'])} ms, {run['requests']:,} requests"


def minimal_line(size: dict) -> str:
    """The minimal app's figures at this size."""
    minimal = size.get("minimal") or {}
    if not minimal:
        return "The minimal app was not measured."
    parts = []
    for run in minimal.values():
        text = f"**{clients(run['clients'])}: {run['rps']:,.0f} req/s**, "
        parts.append(text + (f"FAILED: {run['error']}" if run["error"] else run_figures(run)))
    return "The minimal app's list (bench/minimal_app.py, before the API): " + "; ".join(parts) + "."


def concurrent_line(results: dict, size: dict) -> str:
    run = size["concurrent"]
    if run["error"]:
        return f"**{run['clients']} clients, default list: FAILED: {run['error']}**"
    limit = throughput_limit(results, size)
    ratio = results["meta"].get("throughput_ratio", 0.5)
    target = "-" if limit is None else f"{limit:,.0f} req/s: {verdict(throughput_met(results, size))}"
    lines = [
        f"{run['clients']} concurrent clients on the default list: **{run['rps']:,.0f} req/s** "
        f"(target ≥ {ratio:g} x the minimal app's = {target}), {run_figures(run)}."
    ]
    for name, other in size.get("concurrent_too", {}).items():
        figures = f"FAILED: {other['error']}" if other["error"] else run_figures(other)
        lines.append(f"{other['clients']} clients on `{name}`: **{other['rps']:,.0f} req/s**, {figures}.")
    return " ".join(lines)


def split(row: dict) -> str:
    """p50 as PostgreSQL + the rest of the app in-process + HTTP and gunicorn."""
    sql, app, p50 = row.get("sql_ms"), row.get("app_ms"), row["p50"]
    if sql is None or app is None:
        return ""
    return (
        f"{ms(p50)} ms = {ms(sql)} ms in PostgreSQL ({row['statements']} statements) + {ms(max(app - sql, 0))} ms "
        f"of the app's own work in-process + {ms(max(p50 - app, 0))} ms of HTTP, gunicorn and waiting for a core"
    )


def explain_target_miss(row: dict, size: dict) -> str:
    """Why a scenario misses its target, from its numbers: the database's own time, or what the app adds."""
    limit = limit_ms(row, size)
    text = f"- `{row['name']}` ({row['shown']}): p50 {ms(row['p50'])} ms, target {ratio_text(row)} = {ms(limit)} ms. "
    if total_exact(row) is False:
        text += f"Its total was {row.get('total')}, not the exact {row['expect_total']:,}. "
    if row.get("sql_ms") is None:
        return text + "No SQL time was measured."
    text += split(row) + "."
    slowest = row.get("slowest_sql")
    if row["sql_ms"] >= limit / 2 and slowest:
        text += (
            f" The database is the bottleneck: the slowest statement ({ms(slowest['ms'])} ms) is "
            f"`{shorten(slowest['statement'], 110)}`, whose plan spends the most time in {slowest['hottest']}."
        )
    elif row.get("app_ms") is not None and row["app_ms"] - row["sql_ms"] > row["p50"] - row["app_ms"]:
        text += " Most of it is the app's Python work (where it goes: bench/profile.md)."
    else:
        text += " Most of it is outside the app: HTTP, gunicorn and CPU shared with PostgreSQL, Redis and wrk."
    return text


def why_section(results: dict) -> list[str]:
    big, meta = largest(results), results["meta"]
    lines = [f"## Where {big['size']:,} tasks miss, and why", ""]
    problems = 0
    named = sum(1 for row in big["scenarios"] if row.get("target_ratio") is not None)
    if yardstick_ms(big) is None:
        problems += 1
        lines.append("- The minimal app was not measured: no target can be judged.")
    for row in big["scenarios"]:
        if row.get("skip") or row.get("error"):
            problems += 1
            lines.append(f"- `{row['name']}`: not measured: {row.get('skip') or row.get('error')}.")
        elif target_met(row, big) is False and yardstick_ms(big) is not None:
            problems += 1
            lines.append(explain_target_miss(row, big))
    run = big["concurrent"]
    one = next((row for row in big["scenarios"] if row["name"] == "list_default"), None)
    limit = throughput_limit(results, big)
    if not throughput_met(results, big) and limit is not None:
        problems += 1
        text = f"- {run['clients']} clients on the default list: {run['rps']:,.0f} req/s, target {limit:,.0f}."
        if one and measured(one) and one.get("app_ms"):
            text += (
                f" One request costs {ms(one['app_ms'])} ms of app time in-process ({ms(one['sql_ms'])} ms of it "
                f"in PostgreSQL), and gunicorn, PostgreSQL, Redis and wrk share {meta['cpus']} cores, so the rate "
                f"cannot pass about {meta['cpus']} x 1000 / {ms(one['app_ms'])} ≈ "
                f"{meta['cpus'] * 1000 / one['app_ms']:,.0f} req/s even with perfect use of both cores."
            )
        lines.append(text)
    if not problems:
        lines.append(f"The {named} latency targets and the {run['clients']}-client rate are met.")
    over = [row for row in big["scenarios"] if rule_met(row) is False]
    if over:
        problems += 1
        lines += [
            "",
            f"{len(over)} endpoints take more than 1.5 x their SQL time + 3 ms. Their p50 split into PostgreSQL's "
            "time, the app's own work in-process (the test client: routing, token check, rate limiter's Redis calls, "
            "ORM, serialising, round trips EXPLAIN does not count such as a write's BEGIN and COMMIT) and "
            "the rest (HTTP parsing, gunicorn, and waiting for one of the cores):",
            "",
            "| Scenario | p50 ms | allowed ms | SQL ms | app in-process, less SQL, ms | p50 less in-process, ms |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for row in over:
            app = row.get("app_ms")
            lines.append(
                f"| `{row['name']}` | {ms(row['p50'])} | {ms(allowed_ms(row['sql_ms']))} | {ms(row['sql_ms'])} "
                f"| {signed(None if app is None else app - row['sql_ms'])} "
                f"| {signed(None if app is None else row['p50'] - app)} |"
            )
        lines += [
            "",
            "The two measurements are minutes apart and each is a median, so the last column is only a guide "
            "(a negative value means the in-process median came out slower than the served one).",
        ]
    if not over and not problems:
        lines.append("Nothing: every target and the overhead rule are met.")
    return lines


def results_markdown(results: dict, chart: str) -> str:
    meta = results["meta"]
    gunicorn = meta["gunicorn"]
    big = largest(results)
    pg = meta["postgres"]
    loads = ", ".join(f"{size['load_before']:.2f} before {size['size']:,}" for size in results["sizes"])
    busy = any(size["load_before"] > 0.5 for size in results["sizes"])
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (bench/run.py) on {meta['date']} at commit {meta['commit']}; every run rewrites "
        "this file, so lasting remarks belong in bench/notes.md, which is copied in at the end.",
        "",
        f"![p50 latency beside PostgreSQL's own time per scenario]({chart})",
        "",
        "## Setup",
        "",
        f"- Machine: {meta['cpus']} cores ({meta['cpu_model']}), {meta['memory']} of memory; gunicorn, PostgreSQL, "
        f"Redis and wrk all on it, over loopback. Load average: {loads}"
        + (" (**other work was running: the numbers are noisier than on an idle machine**)." if busy else "."),
        f"- PostgreSQL {pg['server_version']} (shared_buffers {pg['shared_buffers']}, work_mem {pg['work_mem']}), "
        f"Python {meta['python']}, {meta['wrk']}.",
        f"- gunicorn: {gunicorn.get('workers', '?')} workers, {gunicorn.get('worker_class', '?')}, "
        f"{gunicorn.get('threads', '?')} thread(s) each "
        f"({'gunicorn.conf.py' if meta['gunicorn_conf'] else 'no gunicorn.conf.py: --workers 2'}"
        f"{' and the flags given to bench/run.py' if meta.get('overridden') else ''}).",
        "- The app as in production: `APP_ENV=production`, rate limits on and counted in Redis (raised far above "
        f"the load, under a key prefix of the run's own), `LOG_LEVEL={meta.get('log_level', 'WARNING')}`"
        + (
            " (a JSON line per request, as production logs; to bench/out/gunicorn-SIZE.log here)"
            if meta.get("log_level") == "INFO"
            else " (**production logs at INFO: this run skipped the request log's cost**)"
        )
        + ", migrated with `flask db upgrade`, seeded with "
        f"`flask seed-demo` ({meta['users']} demo users; each size adds to the one before), then `VACUUM ANALYZE`.",
        "- The minimal app (bench/minimal_app.py): one route, the default list's 20-row SELECT (newest tasks with "
        "their three people) through psycopg2, `jsonify`; served by gunicorn with the API's worker settings "
        "(bench/minimal_gunicorn.py reads them from gunicorn.conf.py) and measured like the API's default list, "
        "just before the API at each size. It is the yardstick: machines differ by a factor of two or more, the "
        "ratio to it measured in the same run does not.",
        f"- Load: wrk, one request per scenario, {meta['duration']} s each after {meta['warmup']} s of warm-up, "
        f"1 client; then the default list with {meta['clients']} clients for {meta['concurrency_duration']} s "
        f"(and at the largest size {', '.join(meta.get('concurrent_too', []))} too). "
        "Requests as demo0001 (an administrator). Writes alternate their bodies, so every status change changes "
        "its rows. Any answer outside 2xx fails the scenario: none is averaged in.",
        f"- SQL ms: the statements one request of the scenario sends (recorded in-process with a SQLAlchemy "
        f"listener), each run under `EXPLAIN (ANALYZE, TIMING OFF)` {meta['sql_runs']} times after a warm-up, "
        "inside a rolled-back transaction; median of planning + execution time (triggers included), summed over "
        "the request. It leaves out a write's BEGIN and COMMIT (a read sends neither), and the network.",
        "- In-process ms: the median of a second's worth of requests through Flask's test client in one process "
        "after the load: the whole app, its SQL and the rate limiter's Redis calls included, without HTTP and "
        "gunicorn. Where that time goes, by category (token check, limiter, SQL, ORM, dumping, JSON, logging, "
        "metrics, middleware, view code), for each targeted scenario at the largest size: "
        + (f"[{Path(big['profile']).name}]({Path(big['profile']).name})." if big.get("profile") else "not profiled."),
        "- Targets (issue 14) are set for 1,000,000 tasks, as multiples of the minimal app's list in the same run; "
        "the overhead rule is p50 ≤ 1.5 x SQL + 3 ms for every endpoint.",
        f"- The whole run took {meta['total_s'] / 60:.1f} minutes.",
        "",
        f"## Targets at {big['size']:,} tasks",
        "",
        *targets_table(results),
        "",
        *original_section(results),
    ]
    for size in results["sizes"]:
        lines += ["", f"## {size['size']:,} tasks", "", minimal_line(size), "", *scenario_table(size)]
        lines += ["", concurrent_line(results, size)]
    lines += ["", *why_section(results)]
    lines += [
        "",
        f"## Where the SQL time goes at {big['size']:,} tasks",
        "",
        "The slowest statement of each request and the plan node that spends the most time by itself (full plans: "
        f"bench/out/sql-{big['size']}.json).",
        "",
        "| Scenario | SQL ms | Slowest statement | ms | Most time in |",
        "|---|--:|---|--:|---|",
    ]
    for row in big["scenarios"]:
        slowest = row.get("slowest_sql")
        if slowest:
            statement = shorten(slowest["statement"]).replace("|", "\\|")
            hottest = slowest["hottest"]
            lines.append(f"| `{row['name']}` | {ms(row['sql_ms'])} | `{statement}` | {ms(slowest['ms'])} | {hottest} |")
    soak = soak_block()
    if soak:
        lines += ["", SOAK_HEADING, "", soak]
    if NOTES.exists():
        lines += ["", "## Notes", "", NOTES.read_text().strip()]
    return "\n".join(lines) + "\n"


def soak_block(source: Path = SOAK) -> str | None:
    """The soak summary, markers included, from bench/soak.md (None before the first `make soak`)."""
    try:
        text = source.read_text()
    except OSError:
        return None
    start, end = text.find(SOAK_START), text.find(SOAK_END)
    if start < 0 or end < start:
        return None
    return text[start : end + len(SOAK_END)]


def update_soak_section(results: Path, block: str) -> None:
    """Put the soak summary into bench/results.md: between its soak markers, else before its notes, else last."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    start, end = text.find(SOAK_START), text.find(SOAK_END)
    if start >= 0 and end > start:
        text = text[:start] + block + text[end + len(SOAK_END) :]
    else:
        section = f"{SOAK_HEADING}\n\n{block}\n"
        notes = text.find("\n## Notes\n")
        if notes >= 0:
            text = text[: notes + 1] + section + "\n" + text[notes + 1 :]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)


def chart(results: dict, path: Path) -> None:
    """Grouped horizontal bars: p50 and SQL time per scenario for each size, on a log scale, targets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["name"] for row in results["sizes"][0]["scenarios"]]
    sizes = results["sizes"]
    series = []
    palette = [("#9ecae1", "#3182bd"), ("#fdae6b", "#e6550d"), ("#a1d99b", "#31a354")]
    for index, size in enumerate(sizes):
        rows = {row["name"]: row for row in size["scenarios"]}
        light, dark = palette[index % len(palette)]
        label = f"{size['size']:,}"
        series.append((f"p50, {label} tasks", dark, [rows.get(n, {}).get("p50") for n in names], None))
        series.append((f"SQL, {label} tasks", light, [rows.get(n, {}).get("sql_ms") for n in names], "//"))
    height = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(10, 0.42 * len(names) * max(1, len(sizes)) + 1.6))
    for position, (label, color, values, hatch) in enumerate(series):
        ys = [i + (position - (len(series) - 1) / 2) * height for i in range(len(names))]
        bars = [(y, v) for y, v in zip(ys, values, strict=True) if v]
        axes.barh(
            [y for y, _ in bars],
            [max(v, 0.01) for _, v in bars],
            height=height,
            color=color,
            hatch=hatch,
            edgecolor="white" if hatch else color,
            label=label,
        )
    big = largest(results)
    targets = [(i, limit_ms(row, big)) for i, row in enumerate(big["scenarios"]) if limit_ms(row, big)]
    if targets:
        axes.scatter(
            [t for _, t in targets],
            [i for i, _ in targets],
            marker="|",
            s=400,
            color="black",
            label=f"target p50 at {big['size']:,}",
            zorder=3,
        )
    if yardstick_ms(big) is not None:
        axes.axvline(yardstick_ms(big), color="grey", linestyle="--", label=f"minimal app's list, {big['size']:,}")
    axes.set_yticks(range(len(names)), names)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("milliseconds (log scale)")
    axes.grid(axis="x", which="both", alpha=0.3)
    meta = results["meta"]
    commit = meta["commit"].replace(" with uncommitted changes", "+")
    axes.set_title(
        f"p50 latency with one client, and PostgreSQL's own time per request\n{meta['date']}, commit {commit}",
        pad=48,
    )
    axes.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize="small", frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table_section(results: dict) -> str:
    meta, big = results["meta"], largest(results)
    lines = [
        f"Latest `make bench`: {big['size']:,} tasks on PostgreSQL {meta['postgres']['server_version']}, one client, "
        f"{meta['cpus']} cores, gunicorn {meta['gunicorn'].get('workers', '?')} x "
        f"{meta['gunicorn'].get('worker_class', '?')}; {meta['date']}, commit {meta['commit']}. "
        "Full report, other sizes and the SQL behind each number: [bench/results.md](../bench/results.md).",
        "",
        "| Scenario | req/s | p50 ms | p95 ms | p99 ms | SQL ms | Target p50 |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for row in big["scenarios"]:
        if row.get("skip") or row.get("error"):
            lines.append(f"| `{row['name']}` | {'skipped' if row.get('skip') else '**FAILED**'} | | | | | |")
            continue
        lines.append(
            f"| `{row['name']}` | {row['rps']:,.0f} | {ms(row['p50'])} | {ms(row['p95'])} | {ms(row['p99'])} "
            f"| {ms(row.get('sql_ms'))} | {target_text(row, big)} |"
        )
    lines += ["", minimal_line(big), "", concurrent_line(results, big), "", *original_section(results)[2:]]
    return "\n".join(lines)


def update_table(page: Path, section: str) -> bool:
    """Replace what stands between the page's bench markers; say so when there are none."""
    text = page.read_text()
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        print(f"{page.name} has no {TABLE_START} ... {TABLE_END} markers: its table was not updated.")
        return False
    page.write_text(text[: start + len(TABLE_START)] + "\n" + section + "\n" + text[end:])
    print(f"Updated the benchmark table in {page.name}.")
    return True


def workers_markdown(rows: list[dict], meta: dict, size: int, clients: int) -> str:
    lines = [
        "# gunicorn worker settings compared",
        "",
        f"`bench/run.py --compare-workers` on {meta['date']}, commit {meta['commit']}: the default task list "
        f"(`GET /api/tasks`) at {size:,} tasks, {meta['duration']} s per run after {meta['warmup']} s of warm-up, "
        f"{meta['cpus']} cores shared by gunicorn, PostgreSQL {meta['postgres']['server_version']}, Redis and wrk.",
        "",
        f"| gunicorn | 1 client req/s | p50 ms | p99 ms | {clients} clients req/s | p50 ms | p95 ms | p99 ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        one, many = row["c1"], row["cN"]
        failed = " **FAILED**" if one["error"] or many["error"] else ""
        lines.append(
            f"| {row['label']}{failed} | {one['rps']:,.0f} | {ms(one['p50'])} | {ms(one['p99'])} | {many['rps']:,.0f} "
            f"| {ms(many['p50'])} | {ms(many['p95'])} | {ms(many['p99'])} |"
        )
    errors = [f"- {row['label']}: {run['error']}" for row in rows for run in (row["c1"], row["cN"]) if run["error"]]
    if errors:
        lines += ["", "Failures:", "", *errors]
    return "\n".join(lines) + "\n"
