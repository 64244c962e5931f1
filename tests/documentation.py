"""The project's documentation as the tests read it: README.md and docs/*.md, their fenced blocks, their curl examples.

A ```bash block that calls http://127.0.0.1:5000 (the address of `make run`) with curl is an example that
tests/test_readme.py runs. A fenced block with curl in it that calls nothing there must say why it is not run,
on the line just above its fence: <!-- not run: needs a Docker engine -->.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from helpers import ROOT

DEV_ADDRESS = "http://127.0.0.1:5000"
NOT_RUN = re.compile(r"<!-- not run: \S.*-->")
FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
RUN_CALL = re.compile(r"\bcurl\b[^\n]*" + re.escape(DEV_ADDRESS))


def documentation_files() -> list[Path]:
    """README.md first, then docs/*.md by name."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, counted from 1
    language: str
    text: str
    marked_not_run: bool

    def joined(self) -> str:
        """The text with shell line continuations joined, so that one command is one line."""
        return self.text.replace("\\\n", " ")

    @property
    def has_curl(self) -> bool:
        return re.search(r"\bcurl\b", self.text) is not None

    @property
    def is_run(self) -> bool:
        return self.language == "bash" and RUN_CALL.search(self.joined()) is not None

    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, in order."""
    blocks, lines = [], path.read_text().splitlines()
    opening = None
    for number, line in enumerate(lines):
        fence = FENCE.match(line)
        if opening is None and fence:
            opening = (number, fence.group(1), fence.group(2).strip())
        elif opening is not None and fence and line.startswith(opening[1]) and not fence.group(2).strip():
            start, _, language = opening
            marked = start > 0 and NOT_RUN.fullmatch(lines[start - 1].strip()) is not None
            blocks.append(Block(path, start + 1, language, "\n".join(lines[start + 1 : number]) + "\n", marked))
            opening = None
    assert opening is None, f"{path.name}:{opening[0] + 1}: a fenced block is never closed"
    return blocks


def prose(path: Path) -> str:
    """The file without its fenced blocks (blank lines in their place, so line numbers stay)."""
    lines = path.read_text().splitlines()
    for block in fenced_blocks(path):
        last = block.line + block.text.count("\n")
        for number in range(block.line - 1, last + 1):
            lines[number] = ""
    return "\n".join(lines)
