"""The benchmark's reports: bench/results.md, its chart, the table in docs/performance.md and bench/workers.md.

bench/results.md also carries the summary of the latest `make soak` (bench/soak.py): the part of bench/soak.md
between its soak markers, copied in whenever either program writes the file.
"""

import re
from pathlib import Path

BENCH = Path(__file__).resolve().parent
NOTES = BENCH / "notes.md"
TABLE_START, TABLE_END = "<!-- bench:start -->", "<!-- bench:end -->"
SOAK = BENCH / "soak.md"
SOAK_START, SOAK_END = "<!-- soak:start -->", "<!-- soak:end -->"
SOAK_HEADING = "## Soak test (`make soak`)"
TARGET_RPS_16 = 300


def allowed_ms(sql_ms: float) -> float:
    """The issue's overhead rule: an endpoint answers within 1.5 times its own SQL time plus 3 ms."""
    return 1.5 * sql_ms + 3


def measured(row: dict) -> bool:
    return not row.get("skip") and "p50" in row and not row.get("error")


def rule_met(row: dict) -> bool | None:
    if not measured(row) or "sql_ms" not in row:
        return None
    return row["p50"] <= allowed_ms(row["sql_ms"])


def target_met(row: dict) -> bool | None:
    if row.get("target_ms") is None:
        return None
    return measured(row) and row["p50"] < row["target_ms"]


def ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def verdict(met: bool | None) -> str:
    return "" if met is None else "ok" if met else "**missed**"


def largest(results: dict) -> dict:
    return results["sizes"][-1]


def missed_targets(results: dict) -> list[str]:
    """The issue's targets missed at the largest size (they are set for 1M tasks), the overhead rule counted."""
    size = largest(results)
    missed = [
        f"{row['name']} p50 {ms(row.get('p50'))} ms (target {row['target_ms']} ms)"
        for row in size["scenarios"]
        if target_met(row) is False
    ]
    concurrent = size["concurrent"]
    if concurrent["error"] or concurrent["rps"] < TARGET_RPS_16:
        missed.append(f"{concurrent['clients']} clients: {concurrent['rps']:.0f} req/s (target {TARGET_RPS_16})")
    over = [row["name"] for row in size["scenarios"] if rule_met(row) is False]
    if over:
        missed.append(f"{len(over)} endpoints above 1.5 x SQL + 3 ms ({', '.join(over)})")
    return missed


def shorten(statement: str, length: int = 150) -> str:
    statement = re.sub(r"\s+", " ", statement)
    statement = re.sub(r"SELECT .{40,}? FROM", "SELECT … FROM", statement, count=1)
    return statement if len(statement) <= length else statement[: length - 1] + "…"


def scenario_table(size: dict) -> list[str]:
    lines = [
        "| Scenario | Request | req/s | p50 ms | p95 ms | p99 ms | in-process ms | SQL ms | stmts | p50 / SQL "
        "| ≤ 1.5 x SQL + 3 | Target p50 |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for row in size["scenarios"]:
        name = f"`{row['name']}`"
        if row.get("skip"):
            target = f"< {row['target_ms']}: **not measured**" if row.get("target_ms") else ""
            lines.append(f"| {name} | {row['shown']} | skipped: {row['skip']} | | | | | | | | | {target} |")
            continue
        if row.get("error"):
            lines.append(f"| {name} | {row['shown']} | **FAILED: {row['error']}** | | | | | | | | | |")
            continue
        sql = row.get("sql_ms")
        ratio = f"{row['p50'] / sql:.1f}" if sql else "-"
        rule = rule_met(row)
        rule_text = "" if rule is None else f"{verdict(rule)} ({ms(allowed_ms(sql))})"
        target = target_met(row)
        target_text = "" if target is None else f"< {row['target_ms']}: {verdict(target)}"
        lines.append(
            f"| {name} | {row['shown']} | {row['rps']:,.0f} | {ms(row['p50'])} | {ms(row['p95'])} | {ms(row['p99'])} "
            f"| {ms(row.get('app_ms'))} | {ms(sql)} | {row.get('statements', '-')} | {ratio} | {rule_text} "
            f"| {target_text} |"
        )
    return lines


def concurrent_line(size: dict) -> str:
    run = size["concurrent"]
    if run["error"]:
        return f"**{run['clients']} clients, default list: FAILED: {run['error']}**"
    met = verdict(run["rps"] >= TARGET_RPS_16)
    return (
        f"{run['clients']} concurrent clients on the default list: **{run['rps']:,.0f} req/s** "
        f"(target ≥ {TARGET_RPS_16}: {met}), p50 {ms(run['p50'])} ms, p95 {ms(run['p95'])} ms, "
        f"p99 {ms(run['p99'])} ms, {run['requests']:,} requests."
    )


def split(row: dict) -> str:
    """p50 as PostgreSQL + the rest of the app in-process + HTTP and gunicorn."""
    sql, app, p50 = row.get("sql_ms"), row.get("app_ms"), row["p50"]
    if sql is None or app is None:
        return ""
    return (
        f"{ms(p50)} ms = {ms(sql)} ms in PostgreSQL ({row['statements']} statements) + {ms(max(app - sql, 0))} ms "
        f"of the app's own work in-process + {ms(max(p50 - app, 0))} ms of HTTP, gunicorn and waiting for a core"
    )


def explain_target_miss(row: dict) -> str:
    """Why a scenario misses its target, from its numbers: the database's own time, or what the app adds."""
    text = f"- `{row['name']}` ({row['shown']}): p50 {ms(row['p50'])} ms, target {row['target_ms']} ms. "
    if row.get("sql_ms") is None:
        return text + "No SQL time was measured."
    text += split(row) + "."
    slowest = row.get("slowest_sql")
    if row["sql_ms"] >= row["target_ms"] / 2 and slowest:
        text += (
            f" The database is the bottleneck: the slowest statement ({ms(slowest['ms'])} ms) is "
            f"`{shorten(slowest['statement'], 110)}`, whose plan spends the most time in {slowest['hottest']}."
        )
    elif row.get("app_ms") is not None and row["app_ms"] - row["sql_ms"] > row["p50"] - row["app_ms"]:
        text += " Most of it is the app's Python work (see the profile in bench/out/profile-*.txt)."
    else:
        text += " Most of it is outside the app: HTTP, gunicorn and CPU shared with PostgreSQL, Redis and wrk."
    return text


def why_section(results: dict) -> list[str]:
    big, meta = largest(results), results["meta"]
    lines = [f"## Where {big['size']:,} tasks miss, and why", ""]
    problems = 0
    named = sum(1 for row in big["scenarios"] if row.get("target_ms") is not None)
    for row in big["scenarios"]:
        if row.get("skip") or row.get("error"):
            problems += 1
            lines.append(f"- `{row['name']}`: not measured: {row.get('skip') or row.get('error')}.")
        elif target_met(row) is False:
            problems += 1
            lines.append(explain_target_miss(row))
    run = big["concurrent"]
    one = next((row for row in big["scenarios"] if row["name"] == "list_default"), None)
    if run["error"] or run["rps"] < TARGET_RPS_16:
        problems += 1
        text = f"- {run['clients']} clients on the default list: {run['rps']:,.0f} req/s, target {TARGET_RPS_16}."
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
            "ORM, serialising, round trips EXPLAIN does not count such as the pool's pre-ping and BEGIN/COMMIT) and "
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
        "the load, under a key prefix of the run's own), migrated with `flask db upgrade`, seeded with "
        f"`flask seed-demo` ({meta['users']} demo users; each size adds to the one before), then `VACUUM ANALYZE`.",
        f"- Load: wrk, one request per scenario, {meta['duration']} s each after {meta['warmup']} s of warm-up, "
        f"1 client; then the default list with {meta['clients']} clients for {meta['concurrency_duration']} s. "
        "Requests as demo0001 (an administrator). Writes alternate their bodies, so every status change changes "
        "its rows. Any answer outside 2xx fails the scenario: none is averaged in.",
        f"- SQL ms: the statements one request of the scenario sends (recorded in-process with a SQLAlchemy "
        f"listener), each run under `EXPLAIN (ANALYZE, TIMING OFF)` {meta['sql_runs']} times after a warm-up, "
        "inside a rolled-back transaction; median of planning + execution time (triggers included), summed over "
        "the request. It leaves out the round trips of the pool's pre-ping and of BEGIN/COMMIT, and the network.",
        "- In-process ms: the median of a second's worth of requests through Flask's test client in one process "
        "after the load: the whole app, its SQL and the rate limiter's Redis calls included, without HTTP and "
        "gunicorn. cProfile output for some scenarios: bench/out/profile-SIZE-NAME.txt.",
        "- Targets (from the issue) are set for 1,000,000 tasks and one client; the overhead rule is p50 ≤ 1.5 x "
        "SQL + 3 ms for every endpoint.",
        f"- The whole run took {meta['total_s'] / 60:.1f} minutes.",
        "",
        f"## Targets at {big['size']:,} tasks",
        "",
        "| Target | Measured | Verdict |",
        "|---|---|---|",
    ]
    for row in big["scenarios"]:
        if row.get("target_ms") is None:
            continue
        value = "not measured" if row.get("skip") else "FAILED" if row.get("error") else f"p50 {ms(row['p50'])} ms"
        lines.append(f"| `{row['name']}` p50 < {row['target_ms']} ms | {value} | {verdict(target_met(row))} |")
    run = big["concurrent"]
    lines.append(
        f"| default list, {run['clients']} clients ≥ {TARGET_RPS_16} req/s | {run['rps']:,.0f} req/s | "
        f"{verdict(not run['error'] and run['rps'] >= TARGET_RPS_16)} |"
    )
    checked = [rule_met(row) for row in big["scenarios"] if rule_met(row) is not None]
    lines.append(
        f"| every endpoint p50 ≤ 1.5 x SQL + 3 ms | {sum(checked)} of {len(checked)} | {verdict(all(checked))} |"
    )
    for size in results["sizes"]:
        lines += ["", f"## {size['size']:,} tasks", "", *scenario_table(size), "", concurrent_line(size)]
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
    targets = [(i, row["target_ms"]) for i, row in enumerate(largest(results)["scenarios"]) if row.get("target_ms")]
    if targets:
        axes.scatter(
            [t for _, t in targets],
            [i for i, _ in targets],
            marker="|",
            s=400,
            color="black",
            label="target p50 (1M tasks)",
            zorder=3,
        )
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
        target = target_met(row)
        target_text = "" if target is None else f"< {row['target_ms']}: {verdict(target)}"
        lines.append(
            f"| `{row['name']}` | {row['rps']:,.0f} | {ms(row['p50'])} | {ms(row['p95'])} | {ms(row['p99'])} "
            f"| {ms(row.get('sql_ms'))} | {target_text} |"
        )
    lines += ["", concurrent_line(big)]
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
