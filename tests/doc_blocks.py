"""The commands the documentation shows: fenced blocks and inline spans of README.md and docs/*.md.

``blocks(repo_root)`` finds every fenced code block with its file, line, language and text, and
the HTML comments on the lines just above its opening fence. One of them may say how the docs
check treats the block (docs/tests.md, "The docs check"):

    (no marker)                                      run by tests/integration/test_docs_commands.py
    <!-- docs-check: test tests/integration/T.py --> run by that test, which names this doc
    <!-- docs-check: dry-run REASON -->             checked without running, for REASON

Blocks in ``COMMAND_LANGUAGES`` are commands and must be classified; a ``console`` block is a
transcript whose commands are its ``$ `` lines. Other blocks (json, yaml, text) are not commands.
``inline_spans`` gives the backtick spans of the prose, for the inline ``make X`` / ``servekit X`` lint.

    for block in blocks(REPO_ROOT):
        print(block.where, block.language, block.marker, [c.text for c in block.commands()])
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

COMMAND_LANGUAGES = ("bash", "sh", "shell", "console", "python")
MARKER_PREFIX = "docs-check:"
KINDS = ("test", "dry-run")
FENCE_RE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
COMMENT_RE = re.compile(r"^\s*<!--(.*?)-->\s*$")
SPAN_RE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def doc_files(repo_root: Path) -> list[Path]:
    """README.md and docs/*.md, relative to ``repo_root``, in that order."""
    return [Path("README.md"), *sorted(p.relative_to(repo_root) for p in (repo_root / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Marker:
    """A block's ``docs-check`` comment: ``kind`` test (``argument``: the test file) or dry-run (the reason)."""

    kind: str
    argument: str

    @classmethod
    def parse(cls, comment: str) -> Marker:
        """``comment``: the text in ``<!-- -->`` that starts with ``docs-check:``; ValueError says what is wrong."""
        body = comment.strip()[len(MARKER_PREFIX) :].strip()
        kind, _, argument = body.partition(" ")
        argument = argument.strip()
        if kind not in KINDS:
            raise ValueError(f"unknown docs-check marker {kind!r} (known: {', '.join(KINDS)}; none means run)")
        if not argument:
            needs = "the test file that runs it" if kind == "test" else "a reason: why it cannot run in a check"
            raise ValueError(f"docs-check: {kind} needs {needs}")
        return cls(kind, argument)


@dataclass(frozen=True)
class Command:
    """One logical command line of a block (continuation lines joined) and the doc line it starts on."""

    line: int
    text: str


@dataclass(frozen=True)
class Block:
    """One fenced code block: ``line`` is its opening fence's line (1-based) in ``path``."""

    path: Path
    line: int
    language: str
    text: str
    comments: tuple[str, ...]  # the HTML comments just above the fence, top to bottom, without <!-- -->

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def is_command(self) -> bool:
        return self.language in COMMAND_LANGUAGES

    @property
    def marker(self) -> Marker | None:
        """The ``docs-check`` marker (None: the block is run); ValueError for a malformed one."""
        found = [c for c in self.comments if c.strip().startswith(MARKER_PREFIX)]
        if len(found) > 1:
            raise ValueError(f"{len(found)} docs-check markers; one at most")
        return Marker.parse(found[0]) if found else None

    @property
    def kind(self) -> str:
        """``run``, ``test`` or ``dry-run``."""
        marker = self.marker
        return "run" if marker is None else marker.kind

    @property
    def has_prompt(self) -> bool:
        """Whether the block shows ``$ command`` lines (a transcript)."""
        return any(line.startswith("$ ") for line in self.text.splitlines())

    def script(self) -> str:
        """The shell text of the block: all of it, or a transcript's ``$`` lines (and their continuations)."""
        if self.language != "console":
            return self.text
        lines, continued = [], False
        for line in self.text.splitlines():
            if line.startswith("$ ") or continued:
                lines.append(line[2:] if line.startswith("$ ") and not continued else line)
                continued = line.rstrip().endswith("\\")
        return "\n".join(lines) + "\n"

    def commands(self) -> list[Command]:
        """The logical shell lines (not python), continuations joined, blank and comment-only lines left out."""
        if self.language == "python":
            return []
        raw = self.text.splitlines()
        prompt_lines = [i for i, line in enumerate(raw) if line.startswith("$ ")]
        commands: list[Command] = []
        pending: list[str] = []
        start = 0
        for i, line in enumerate(raw):
            if self.language == "console" and not pending:
                if i not in prompt_lines:
                    continue
                line = line[2:]
            if not pending:
                start = i
            stripped = line.rstrip()
            if stripped.endswith("\\"):
                pending.append(stripped[:-1])
                continue
            pending.append(stripped)
            text = " ".join(part.strip() for part in pending).strip()
            pending = []
            if text and not text.startswith("#"):
                commands.append(Command(self.line + 1 + start, text))
        return commands


def blocks(repo_root: Path, paths: list[Path] | None = None) -> list[Block]:
    """Every fenced block of the docs (``paths``, default ``doc_files``), in document order."""
    found: list[Block] = []
    for path in paths if paths is not None else doc_files(repo_root):
        lines = (repo_root / path).read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            opening = FENCE_RE.match(lines[i])
            if opening is None:
                i += 1
                continue
            indent, fence, language = opening.groups()
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(fence):
                end += 1
            comments = []
            above = i - 1
            while above >= 0 and (comment := COMMENT_RE.match(lines[above])):
                comments.insert(0, comment.group(1).strip())
                above -= 1
            body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]]
            found.append(Block(path, i + 1, language.lower(), "\n".join(body) + "\n", tuple(comments)))
            i = end + 1
    return found


def dangling_markers(repo_root: Path, paths: list[Path] | None = None) -> list[str]:
    """``path:line`` of every ``docs-check`` comment that is not just above a fenced block."""
    above_blocks = {
        (block.path, block.line - 1 - k) for block in blocks(repo_root, paths) for k in range(len(block.comments))
    }
    dangling = []
    for path in paths if paths is not None else doc_files(repo_root):
        for number, line in enumerate((repo_root / path).read_text(encoding="utf-8").splitlines(), 1):
            comment = COMMENT_RE.match(line)
            if comment and comment.group(1).strip().startswith(MARKER_PREFIX) and (path, number) not in above_blocks:
                dangling.append(f"{path}:{number}")
    return dangling


@dataclass(frozen=True)
class Span:
    """An inline code span of the prose (outside fenced blocks), whitespace runs folded to one space."""

    path: Path
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def inline_spans(repo_root: Path, paths: list[Path] | None = None) -> list[Span]:
    """Every backtick span outside fenced blocks; a span may run over one line break, never a blank line."""
    spans: list[Span] = []
    fenced = {(b.path, n) for b in blocks(repo_root, paths) for n in range(b.line, b.line + b.text.count("\n") + 2)}
    for path in paths if paths is not None else doc_files(repo_root):
        lines = (repo_root / path).read_text(encoding="utf-8").splitlines()
        prose = "\n".join("" if (path, n) in fenced else line for n, line in enumerate(lines, 1))
        for match in SPAN_RE.finditer(prose):
            if "\n\n" in match.group(1):
                continue
            line = prose.count("\n", 0, match.start()) + 1
            spans.append(Span(path, line, " ".join(match.group(1).split())))
    return spans
