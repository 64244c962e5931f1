"""Every relative link of README.md and docs/*.md leads somewhere: to a file that exists and, with a #fragment, to
a heading of that file as GitHub names its anchors."""

import re
from collections import Counter
from pathlib import Path

from documentation import documentation_files, prose

# [text](target) and ![alt](target), with an optional "title"; the text may hold one level of brackets.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
HTML_ANCHOR = re.compile(r"<a\s[^>]*\b(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
ABSOLUTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text as shown (links and code marks gone), in lower case, every
    character but letters, digits, `_`, `-` and spaces dropped, spaces as `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file: its headings' (a repeated one gets -1, -2, ...) and explicit HTML ones."""
    found, seen = set(), Counter()
    for heading in HEADING.findall(prose(path)):
        anchor = github_anchor(heading)
        found.add(f"{anchor}-{seen[anchor]}" if seen[anchor] else anchor)
        seen[anchor] += 1
    return found | set(HTML_ANCHOR.findall(path.read_text()))


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link in the file's prose, leaving out code blocks and code spans."""
    text = CODE_SPAN.sub(lambda span: re.sub(r"[^\n]", " ", span.group()), prose(path))
    found = [(match.start(), match.group(1)) for pattern in (LINK, REFERENCE) for match in pattern.finditer(text)]
    return [(text.count("\n", 0, start) + 1, target) for start, target in sorted(found)]


def broken_links(files: list[Path]) -> list[str]:
    """A line for each relative link among ``files`` that leads nowhere."""
    broken = []
    for path in files:
        for line, target in links(path):
            if ABSOLUTE.match(target):
                continue
            file_part, _, fragment = target.partition("#")
            destination = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.name}:{line}: {target}"
            if not destination.exists():
                broken.append(f"{where} (no such file)")
            elif fragment and destination.suffix == ".md" and fragment not in anchors(destination):
                broken.append(f"{where} (no heading #{fragment} in {destination.name})")
    return broken


def test_every_relative_link_and_anchor_between_the_documents_resolves():
    files = documentation_files()

    assert len(files) >= 7  # README.md and docs/: api, security, deployment, operations, performance, development
    assert broken_links(files) == []
    linked = {target.partition("#")[0] for path in files for _, target in links(path)}
    assert {"docs/api.md", "docs/security.md", "docs/deployment.md", "docs/operations.md"} <= linked


def test_anchors_are_named_as_github_names_them():
    assert github_anchor("Serving: `gunicorn.conf.py`") == "serving-gunicornconfpy"
    assert github_anchor("Safe concurrent edits: `ETag` and `If-Match`") == "safe-concurrent-edits-etag-and-if-match"
    assert github_anchor("Upgrading to this version (migration 0004)") == "upgrading-to-this-version-migration-0004"
    assert github_anchor("`APP_ENV` and `FLASK_ENV`") == "app_env-and-flask_env"
    assert github_anchor("History: the audit trail") == "history-the-audit-trail"
    assert github_anchor("Über [the API](api.md)") == "über-the-api"


def test_a_broken_link_or_anchor_is_noticed(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text(
        "# Guide\n\n## Setup\n\n## Setup\n\n```bash\n# Not a heading: a comment in a code block\n```\n"
    )
    (tmp_path / "README.md").write_text(
        "# Readme\n\n"
        "[fine](docs/guide.md#setup-1) [fine](#readme) [fine](https://example.com/#nowhere) `[code](#nowhere)`\n"
        "[gone](docs/missing.md) [wrong anchor](docs/guide.md#set-up)\n"
        "[comment](docs/guide.md#not-a-heading-a-comment-in-a-code-block)\n\n"
        "```markdown\n[in a code block](#nowhere)\n```\n"
    )

    broken = broken_links([tmp_path / "README.md", tmp_path / "docs" / "guide.md"])

    assert broken == [
        "README.md:4: docs/missing.md (no such file)",
        "README.md:4: docs/guide.md#set-up (no heading #set-up in guide.md)",
        "README.md:5: docs/guide.md#not-a-heading-a-comment-in-a-code-block "
        "(no heading #not-a-heading-a-comment-in-a-code-block in guide.md)",
    ]
